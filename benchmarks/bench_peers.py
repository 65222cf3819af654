"""skSAE at its defaults against peer SAE libraries at their best, in one process.

Contestants, all TopK SAEs with the same ``k`` and ``n_components = 8 * D``, trained
on the same rows for the same number of tokens:

- ``skSAE``: ``SparseAutoencoder(architecture="topk", k=k, n_components=F,
  max_iter=passes, random_state=0)``, nothing else: no ``batch_size`` or
  ``learning_rate``, the way a new user calls it.
- ``plain``: the plain torch TopK loop of ``bench_training.py`` (imported, not
  copied: Adam, constant learning rate, unit-norm decoder, inputs scaled to a mean
  squared norm of D), at each point of a batch x learning-rate grid.
- ``sae-lens``: SAELens' ``TopKTrainingSAE`` trained by its own ``SAETrainer`` from
  an in-memory iterator of batches (the trainer takes any iterator of tensors),
  with its recommended input normalisation (``expected_average_only_in``) and
  the runner's default schedule: constant, then a linear decay to zero over the
  last fifth (``lr_end = lr / 10``, the runner's default, is passed, but its
  ``get_lr_scheduler`` replaces it by ``lr`` for the constant schedule, so the decay
  runs from ``lr`` to 0, as skSAE's does), AuxK and its other defaults.
- ``dictionary_learning``: ``AutoEncoderTopK`` trained by ``TopKTrainer`` through
  ``trainSAE`` (``normalize_activations=True``), warm-up over the first 5% of
  steps (its default of 1000 steps is longer than these runs) and linear decay
  from 80%, as in the library's demo configuration; read back with
  ``AutoEncoderTopK.from_pretrained`` from the ``ae.pt`` it saves.

Each peer and the plain loop run at every point of the grid; its best point is the
one with the highest held-out variance explained (chosen on the held-out rows:
generous to the peers). The peers are optional: where ``sae_lens`` or
``dictionary_learning`` cannot be imported the table says so and the rest runs
(the project venv, and CI). Install them in a venv of their own; see
``benchmarks/README.md``.

Measured on held-out rows: FVE (variance explained, ``1 - SSE / SST`` around the
held-out mean, as ``SparseAutoencoder.score``), on synthetic data MMCS (mean over
the true directions of the best cosine with a decoder row) and the fraction of
true directions recovered above 0.9, the dead fraction (latents that never fire
on the held-out rows), and training tokens per second (tokens over the wall time
of the whole training call, initialisation and normalisation estimates included).

Two tables:

1. Equal tokens: every fit sees ``rows * passes`` tokens.
2. Equal wall time: each rival's best configuration again, with its token
   budget scaled to what it trains in the wall time of skSAE's default fit (its
   tokens/s from table 1 times skSAE's seconds; whole passes for the plain
   loop, whole batches for the peers). The schedules still run to their end
   (decay included), which is fairer than stopping a run midway. skSAE's row is
   its default fit.

Data: ``--data synthetic`` (default) is ``bench_frontier.make_synthetic``: random
unit directions in D dimensions, each on with probability proportional to
``(i + 1) ** -0.5`` (``mean_active`` on per row), magnitudes in [0.5, 1.5],
noise, a fixed offset. ``--data smollm2`` takes SmolLM2-135M block-6 activations
of the pydoc texts (``bench_frontier.load_activations``, cached in
``benchmarks/output/``), whole documents held out; no ground truth there.

Run from the repository root, with the peers' venv::

    /work/venv-peers/bin/python benchmarks/bench_peers.py            # synthetic
    /work/venv-peers/bin/python benchmarks/bench_peers.py --data smollm2
    python benchmarks/bench_peers.py --quick   # smoke test, seconds; peers optional

Shape suffixes in the torch code: N rows, B batch rows, D n_features, F n_components,
K active latents.
"""

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# The peers' trainers draw tqdm bars; a table is what this script prints.
os.environ.setdefault("TQDM_DISABLE", "1")

import bench_training
import numpy as np
import torch
from _shared import busy_cpu_seconds
from bench_frontier import make_synthetic, mean_max_cosine

import skSAE
from skSAE import SparseAutoencoder

SEED = 0
RECOVERED_COSINE = 0.9
SYNTHETIC = {
    "n_features": 128,
    "n_true": 1024,
    "mean_active": 16,
    "noise": 0.02,
    "rows": 65_536,
    "test_rows": 8192,
}
QUICK_SYNTHETIC = {
    "n_features": 16,
    "n_true": 64,
    "mean_active": 4,
    "noise": 0.02,
    "rows": 2048,
    "test_rows": 512,
}
REAL = {"layer": 6, "context_size": 128, "test_tokens": 10_000}
EXPANSION = 8
K, QUICK_K = 32, 4
PASSES, QUICK_PASSES = 8, 2
BATCH_SIZES, QUICK_BATCH_SIZES = (1024, 4096), (256,)
LEARNING_RATES, QUICK_LEARNING_RATES = (5e-4, 1e-3, 2e-3), (1e-3,)
OUTPUT = Path(__file__).resolve().parent / "output"


def find_peers():
    """Import the peer libraries that are installed; returns {name: module or None}."""
    peers = {}
    for name in ("sae_lens", "dictionary_learning"):
        try:
            peers[name] = __import__(name)
        except ImportError:
            peers[name] = None
    return peers


class Batches:
    """Endless full batches of rows of ``X_ND``, in a fresh random order each pass.

    A plain iterator, not a generator: ``trainSAE`` first draws its norm estimate
    through ``tqdm``, whose disabled ``yield from`` would close a generator when
    that loop breaks, leaving no batch for training.
    """

    def __init__(self, X_ND, batch_size, seed=SEED):
        self.X_ND, self.batch_size = X_ND, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.pending_N = torch.empty(0, dtype=torch.long)

    def __iter__(self):
        return self

    def __next__(self):
        while self.pending_N.numel() < self.batch_size:
            order_N = torch.randperm(self.X_ND.shape[0], generator=self.generator)
            self.pending_N = torch.cat([self.pending_N, order_N])
        batch_BD = self.X_ND[self.pending_N[: self.batch_size]]
        self.pending_N = self.pending_N[self.batch_size :]
        return batch_BD


@contextlib.contextmanager
def seeded_global_rng():
    """The peers initialise from torch's global generator: seed it, then restore it."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        yield


# ------------------------------------------------------------------------ contestants
# Each returns (encode, decode, components): torch functions on float32 rows and
# codes in the units of X, and the decoder rows as an (F, D) array.


def fit_sksae(X, *, n_components, k, tokens):
    passes = tokens // X.shape[0]
    sae = SparseAutoencoder(
        architecture="topk", k=k, n_components=n_components, max_iter=passes, random_state=SEED
    ).fit(X)

    def encode(x_ND):
        return torch.from_numpy(sae.transform(x_ND.numpy()))

    def decode(codes_NF):
        return torch.from_numpy(sae.inverse_transform(codes_NF.numpy()))

    return encode, decode, sae.components_


def fit_plain(X, *, n_components, k, tokens, batch_size, learning_rate):
    passes = max(1, round(tokens / X.shape[0]))
    saved = bench_training.LEARNING_RATE
    bench_training.LEARNING_RATE = learning_rate  # the loop reads this module constant
    try:
        weights = bench_training.fit_hand_loop(
            X,
            architecture="topk",
            n_components=n_components,
            k=k,
            batch_size=batch_size,
            epochs=passes,
            device=torch.device("cpu"),
        )
    finally:
        bench_training.LEARNING_RATE = saved
    W = {name: torch.from_numpy(value) for name, value in weights.items()}

    def encode(x_ND):
        pre_NF = x_ND @ W["W_enc"] + W["b_enc"]
        values_NK, idx_NK = pre_NF.topk(k, dim=1, sorted=False)
        return torch.zeros_like(pre_NF).scatter(1, idx_NK, values_NK.relu())

    def decode(codes_NF):
        return codes_NF @ W["W_dec"] + W["b_dec"]

    return encode, decode, weights["W_dec"]


def fit_sae_lens(X, *, n_components, k, tokens, batch_size, learning_rate):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    X_ND = torch.from_numpy(X)
    steps = max(1, tokens // batch_size)
    with seeded_global_rng():
        sae = TopKTrainingSAE(
            TopKTrainingSAEConfig(
                d_in=X.shape[1],
                d_sae=n_components,
                k=k,
                normalize_activations="expected_average_only_in",
                device="cpu",
            )
        )
        trainer = SAETrainer(
            cfg=SAETrainerConfig(
                total_training_samples=steps * batch_size,
                train_batch_size_samples=batch_size,
                lr=learning_rate,
                lr_end=learning_rate / 10,
                lr_decay_steps=steps // 5,
                device="cpu",
                # One pass over X for the norm estimate, at most the default 1000 batches.
                n_batches_for_norm_estimate=max(1, min(1000, X.shape[0] // batch_size)),
                logger=LoggingConfig(log_to_wandb=False),
            ),
            sae=sae,
            data_provider=Batches(X_ND, batch_size),
        )
        sae = trainer.fit()  # folds the normalisation into the weights
    sae.eval()

    def encode(x_ND):
        with torch.no_grad():
            return sae.encode(x_ND)

    def decode(codes_NF):
        with torch.no_grad():
            return sae.decode(codes_NF)

    return encode, decode, sae.W_dec.detach().numpy()


def fit_dictionary_learning(X, *, n_components, k, tokens, batch_size, learning_rate):
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE

    X_ND = torch.from_numpy(X)
    steps = max(4, tokens // batch_size)  # its schedule needs warm-up < decay < steps
    warmup = max(1, steps // 20)
    config = {
        "trainer": TopKTrainer,
        "steps": steps,
        "activation_dim": X.shape[1],
        "dict_size": n_components,
        "k": k,
        "layer": 0,  # required labels only
        "lm_name": "bench_peers",
        "lr": learning_rate,
        "warmup_steps": warmup,
        "decay_start": max(warmup + 1, int(0.8 * steps)),
        "seed": SEED,
        "device": "cpu",
    }
    with tempfile.TemporaryDirectory() as folder, seeded_global_rng():
        trainSAE(
            data=Batches(X_ND, batch_size),
            trainer_configs=[config],
            steps=steps,
            save_dir=folder,
            normalize_activations=True,
            device="cpu",
        )
        ae = AutoEncoderTopK.from_pretrained(os.path.join(folder, "trainer_0", "ae.pt"))
    ae.eval()

    def encode(x_ND):
        with torch.no_grad():
            return ae.encode(x_ND)

    def decode(codes_NF):
        with torch.no_grad():
            return ae.decode(codes_NF)

    return encode, decode, ae.decoder.weight.detach().T.numpy()


PEER_FITS = {"sae_lens": fit_sae_lens, "dictionary_learning": fit_dictionary_learning}
LABELS = {"sae_lens": "sae-lens", "dictionary_learning": "dictionary_learning"}


# ------------------------------------------------------------------------ measuring


def measure(name, config, fit, X_train, X_test, directions, tokens, **options):
    """Train one contestant and measure it on the held-out rows; returns a result dict."""
    start, start_cpu, start_busy = time.perf_counter(), time.process_time(), busy_cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):  # dictionary_learning prints its norm
        encode, decode, components = fit(X_train, tokens=tokens, **options)
    seconds = time.perf_counter() - start
    cpu, busy = time.process_time() - start_cpu, busy_cpu_seconds()
    if name == "plain":  # whole passes
        tokens = max(1, round(tokens / X_train.shape[0])) * X_train.shape[0]
    elif name != "skSAE":  # whole batches
        tokens = max(1, tokens // options["batch_size"]) * options["batch_size"]
    x_ND = torch.from_numpy(X_test)
    codes_NF = encode(x_ND)
    x_hat_ND = decode(codes_NF)
    residual = (x_hat_ND.double() - x_ND.double()).square().sum()
    total = (x_ND.double() - x_ND.double().mean(dim=0)).square().sum()
    result = {
        "name": name,
        "config": config,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "fve": float(1 - residual / total),
        "dead": float((codes_NF != 0).sum(dim=0).eq(0).double().mean()),
        "l0": float((codes_NF != 0).sum(dim=1).double().mean()),
        "others": (
            None
            if busy is None
            else max(0.0, busy - start_busy - cpu) / (seconds * (os.cpu_count() or 1))
        ),
    }
    print(
        f"  {name} {config}: {tokens} tokens, {seconds:.1f} s, FVE {result['fve']:.3f}",
        file=sys.stderr,
        flush=True,
    )
    if directions is not None:
        learned = components / np.linalg.norm(components, axis=1, keepdims=True).clip(1e-12)
        best = (directions @ learned.T).max(axis=1)
        result["mmcs"] = mean_max_cosine(directions, components)
        result["recovered"] = float((best > RECOVERED_COSINE).mean())
    return result


def print_table(title, results):
    print(f"\n{title}")
    header = (
        f"{'library':<20} {'config':<22} {'tokens':>9} {'fit s':>7} {'tok/s':>8} "
        f"{'FVE':>6} {'MMCS':>6} {'>0.9':>6} {'dead':>6} {'L0':>6} {'others':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        mmcs = f"{r['mmcs']:>6.3f}" if "mmcs" in r else f"{'n/a':>6}"
        recovered = f"{r['recovered']:>6.3f}" if "recovered" in r else f"{'n/a':>6}"
        others = f"{r['others']:>6.0%}" if r["others"] is not None else f"{'n/a':>6}"
        print(
            f"{r['label']:<20} {r['config']:<22} {r['tokens']:>9} {r['seconds']:>7.1f} "
            f"{r['tokens_per_second']:>8.0f} {r['fve']:>6.3f} {mmcs} {recovered} "
            f"{r['dead']:>6.3f} {r['l0']:>6.1f} {others}"
        )


def load_data(args):
    """(X_train, X_test, directions or None, description)."""
    if args.data == "synthetic":
        config = QUICK_SYNTHETIC if args.quick else SYNTHETIC
        X_train, X_test, directions = make_synthetic(config, seed=SEED)
        description = (
            f"synthetic: D={config['n_features']}, {config['n_true']} true directions, "
            f"{config['mean_active']} on per row (power law), noise {config['noise']}, "
            f"{X_train.shape[0]} train / {X_test.shape[0]} held-out rows"
        )
        return X_train, X_test, directions, description
    from bench_frontier import load_activations, split_by_document

    from skSAE import corpora

    OUTPUT.mkdir(exist_ok=True)
    activations, doc_index, _ = load_activations(
        "SmolLM2", corpora.smollm2_path(), REAL["layer"], REAL, OUTPUT, False, False
    )
    held_out = split_by_document(doc_index, REAL["test_tokens"])
    description = (
        f"SmolLM2-135M block {REAL['layer']} on the pydoc texts: D={activations.shape[1]}, "
        f"{(~held_out).sum()} train / {held_out.sum()} held-out tokens (whole documents)"
    )
    X = activations.astype(np.float32)
    return X[~held_out], X[held_out], None, description


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("synthetic", "smollm2"), default="synthetic")
    parser.add_argument("--passes", type=int, default=None, help=f"default {PASSES}")
    parser.add_argument(
        "--rivals",
        default="plain,sae_lens,dictionary_learning",
        help="comma-separated contestants besides skSAE (default: all)",
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help=f"default {BATCH_SIZES}"
    )
    parser.add_argument(
        "--learning-rates", type=float, nargs="+", default=None, help=f"default {LEARNING_RATES}"
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.data = "synthetic"
    return args


def main(argv=None):
    args = parse_args(argv)
    peers = find_peers()
    k = QUICK_K if args.quick else K
    passes = args.passes or (QUICK_PASSES if args.quick else PASSES)
    batch_sizes = QUICK_BATCH_SIZES if args.quick else tuple(args.batch_sizes or BATCH_SIZES)
    learning_rates = (
        QUICK_LEARNING_RATES if args.quick else tuple(args.learning_rates or LEARNING_RATES)
    )
    started = time.perf_counter()
    X_train, X_test, directions, description = load_data(args)
    n_components = EXPANSION * X_train.shape[1]
    tokens = X_train.shape[0] * passes

    print("skSAE at its defaults against peer SAE libraries at their best (TopK)")
    versions = [f"skSAE {skSAE.__version__}", f"torch {torch.__version__}"]
    for name, module in peers.items():
        versions.append(
            f"{LABELS[name]} {getattr(module, '__version__', '?')}"
            if module
            else f"{LABELS[name]} not found"
        )
    print(
        ", ".join(versions) + f", python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"torch.get_num_threads()={torch.get_num_threads()}"
    )
    missing = [LABELS[name] for name, module in peers.items() if module is None]
    if missing:
        print(
            f"peers not found: {', '.join(missing)} (install them in their own venv, see "
            "benchmarks/README.md); running the others only"
        )
    print(description)
    print(
        f"k={k}, n_components={n_components}, {passes} passes = {tokens} tokens per fit; "
        f"grid batch {batch_sizes} x lr {learning_rates} for every contestant but skSAE"
    )
    print(
        f"load average at start: {os.getloadavg()[0]:.2f} over {os.cpu_count()} CPUs "
        "(tok/s is a wall-clock figure; others = share of all CPUs other processes used)"
    )

    shared = dict(X_train=X_train, X_test=X_test, directions=directions)
    sizes = dict(n_components=n_components, k=k)
    rivals = args.rivals.split(",")
    fits = {"plain": fit_plain} if "plain" in rivals else {}
    fits.update(
        {name: PEER_FITS[name] for name, module in peers.items() if module and name in rivals}
    )
    # Warm-up: one tiny fit of each, so that no contestant pays torch's first calls.
    warm_rows = min(batch_sizes)
    with contextlib.redirect_stdout(io.StringIO()):
        fit_sksae(X_train[:warm_rows], tokens=warm_rows, **sizes)
        for fit in fits.values():
            fit(
                X_train[:warm_rows],
                tokens=warm_rows,
                batch_size=warm_rows,
                learning_rate=learning_rates[0],
                **sizes,
            )
    ours = measure("skSAE", "defaults", fit_sksae, tokens=tokens, **shared, **sizes)
    ours["label"] = "skSAE"
    grid_results, best = [ours], {}
    for name, fit in fits.items():
        for batch_size in batch_sizes:
            for learning_rate in learning_rates:
                result = measure(
                    name,
                    f"batch {batch_size} lr {learning_rate:g}",
                    fit,
                    tokens=tokens,
                    batch_size=batch_size,
                    learning_rate=learning_rate,
                    **shared,
                    **sizes,
                )
                result["options"] = dict(batch_size=batch_size, learning_rate=learning_rate)
                result["label"] = LABELS.get(name, name)
                grid_results.append(result)
                if name not in best or result["fve"] > best[name]["fve"]:
                    best[name] = result
    for result in best.values():
        result["label"] += " *"
    print_table("== equal tokens (* = best of its grid by held-out FVE)", grid_results)

    time_results = [ours]
    for name, fit in fits.items():
        budget = int(best[name]["tokens_per_second"] * ours["seconds"])
        result = measure(
            name,
            best[name]["config"],
            fit,
            tokens=max(budget, best[name]["options"]["batch_size"]),
            **best[name]["options"],
            **shared,
            **sizes,
        )
        result["label"] = LABELS.get(name, name)
        time_results.append(result)
    print_table(
        f"== equal wall time: each rival's best config, tokens scaled to skSAE's "
        f"{ours['seconds']:.1f} s",
        time_results,
    )
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s, load average at end: "
        f"{os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
