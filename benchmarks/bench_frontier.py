"""Sparsity frontier of every architecture: L0 against variance explained, same run.

For each architecture the script sweeps its sparsity knob, fits one
`SparseAutoencoder` per value and measures it on held-out rows, on two data sets:

- **synthetic**: rows built from known ground-truth directions, so that the
  learned dictionary can be checked against the truth. ``n_true`` random unit
  directions in ``D`` dimensions; each row switches each direction on
  independently with probability ``p_i = c * (i + 1) ** -0.5`` (``c`` chosen so
  that about 4.5 are on per row), with a magnitude drawn uniformly from
  [0.5, 1.5], adds Gaussian noise (standard deviation 0.02 per coordinate) and a
  fixed offset (a random vector of norm 1). Training and held-out rows come from
  the same generator. Default ``D=64``, ``n_true=256``, ``n_components=256``
  (one latent per true direction), 65,536 training and 8192 held-out rows,
  batches of 1024, 32 epochs (2048 steps).
- **real**: residual-stream activations (``resid_post``) of block 15 (the
  middle of 30) of SmolLM2-135M on Python's pydoc topics
  (`skSAE.corpora.pydoc_texts`), the first position of every context of 128
  tokens dropped (attention sink). Whole documents are held out (about 10k
  tokens), the rest trains. Falls back to block 3 of all-MiniLM-L6-v2 when
  SmolLM2 is not installed. The activations are extracted once and cached in the
  output folder (``--refresh`` extracts again). ``n_components = 8 * d_model``
  (4608), batches of 512, 2 epochs: about 400 steps and 200k training tokens per
  fit, a short run by SAE standards, chosen to keep the part near 20 minutes.

Architectures and their knob (one row group each):

- ``reference``: ReLU + L1 as the original seed code trained it
  (``architecture="relu", learning_rate=1e-3, decay_fraction=0.0,
  aux_coefficient=0.0``), swept over ``l1_coefficient``.
- ``relu``, ``jumprelu``, ``gated``: the library's defaults, swept over
  ``target_l0`` (the calibrated coefficient, ``sparsity_coefficient_``, is
  printed in the ``coef`` column).
- ``topk``, ``batchtopk``, ``matryoshka``: the defaults, swept over ``k``.

All but ``reference`` use the library's defaults for the batch size and the learning
rate (``batch_size="auto"``, ``learning_rate=None``: about 1000 steps at ``0.3 /
sqrt(steps)``) and the schedule; ``reference`` keeps the seed's batch size (1024
synthetic, 512 real) and rate. Every fit uses the same ``max_iter`` and
``random_state``.

Metrics, on the held-out rows unless said otherwise:

- ``L0``: mean count of non-zero codes per row of ``transform``;
  ``L0/tgt`` is it over the target (``target_l0`` or ``k``).
- ``EV``: variance explained, ``sae.score`` (1 - FVU).
- ``dead``: ``sae.dead_fraction_`` (latents silent over the last pass of training);
  ``dead(ho)``: fraction of latents never active on the held-out rows.
- ``cos`` (synthetic only): ground-truth recovery, the mean over the true
  directions of the largest cosine similarity with any row of ``components_``.
- ``tok/s``: training rows processed (rows x epochs) per second of ``fit`` wall
  time; ``others`` is the share of all CPUs that other processes used during
  that fit (from ``/proc/stat``; above a few percent, the timing is disturbed).

Below each table, every architecture's EV (and, synthetic, ``cos``) is
interpolated at common L0 values, linearly in log L0 between its sweep points
("n/a" outside its sweep), next to the difference to ``reference``. The
frontier plots (L0 on a log axis, one line per architecture) are saved as PNG
in the output folder (default ``benchmarks/output/``), with the results as JSON.
Loss recovered is not measured: on 2 CPU cores a full forward pass of SmolLM2
runs at about 540 tokens/s, so it would add minutes per point.

Run from the repository root::

    python benchmarks/bench_frontier.py                   # both parts, about 24 min on 2 cores
    python benchmarks/bench_frontier.py --synthetic-only  # about 5 min
    python benchmarks/bench_frontier.py --quick           # tiny smoke test, seconds
    python benchmarks/bench_frontier.py --real-only --refresh --output /tmp/frontier

``--quick`` runs tiny sizes and, for the real part, a tiny random Llama model
built on the fly, so it needs no model package.
"""

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _shared import busy_cpu_seconds, save_character_llama

import skSAE
from skSAE import ActivationExtractor, SparseAutoencoder, corpora
from skSAE.metrics import dead_fraction, mean_l0

SEED = 0
ARCHITECTURES = ("reference", "relu", "topk", "batchtopk", "matryoshka", "jumprelu", "gated")
# The sparsity knob of each row group; target_l0 and k take the L0 grid's values.
KNOBS = {
    "reference": "l1_coefficient",
    "relu": "target_l0",
    "topk": "k",
    "batchtopk": "k",
    "matryoshka": "k",
    "jumprelu": "target_l0",
    "gated": "target_l0",
}
# The seed code's training: ReLU + L1, constant learning rate 1e-3, no AuxK.
REFERENCE_PARAMS = {
    "architecture": "relu",
    "learning_rate": 1e-3,
    "decay_fraction": 0.0,
    "aux_coefficient": 0.0,
}

# Sizes of each part. "l1" is the reference's sweep, chosen so that its L0 spans the
# grid; the other architectures take the grid itself as target_l0 or k.
SYNTHETIC = {
    "n_features": 64,
    "n_true": 256,
    "n_components": 256,
    "mean_active": 4.5,
    "noise": 0.02,
    "rows": 65_536,
    "test_rows": 8192,
    "batch_size": 1024,
    "epochs": 32,
    "grid": (2, 4, 8, 16),
    "l1": (1.0, 2.0, 3.0, 4.5, 6.0, 8.0),
}
REAL = {
    "layer": 15,  # SmolLM2-135M has 30 blocks; MiniLM (6 layers) uses REAL_FALLBACK_LAYER
    "context_size": 128,
    "expansion_factor": 8,
    "test_tokens": 10_000,
    "batch_size": 512,
    "epochs": 2,
    "grid": (16, 32, 64, 128),
    "l1": (0.7, 1.0, 1.4, 2.0),
}
REAL_FALLBACK_LAYER = 3
QUICK_SYNTHETIC = {
    **SYNTHETIC,
    "n_features": 16,
    "n_true": 32,
    "n_components": 32,
    "mean_active": 3.0,
    "rows": 2048,
    "test_rows": 512,
    "batch_size": 256,
    "epochs": 2,
    "grid": (2, 4),
    "l1": (1.0, 4.0),
}
QUICK_REAL = {
    **REAL,
    "layer": 1,
    "expansion_factor": 4,
    "test_tokens": 500,
    "batch_size": 256,
    "epochs": 2,
    "grid": (4, 8),
    "l1": (1.0, 4.0),
}
QUICK_CHARACTERS = 6000  # of pydoc text, tokenised character by character


# ------------------------------------------------------------------------------ data


def make_synthetic(config, seed=SEED):
    """Training rows, held-out rows and the true directions of the synthetic set.

    Returns
    -------
    X_train : ndarray of shape (rows, n_features), float32
    X_test : ndarray of shape (test_rows, n_features), float32
    directions : ndarray of shape (n_true, n_features)
        The ground-truth unit directions.
    """
    rng = np.random.default_rng(seed)
    n_true, n_features = config["n_true"], config["n_features"]
    directions = rng.standard_normal((n_true, n_features))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    weights = (np.arange(n_true) + 1.0) ** -0.5
    probabilities = weights * config["mean_active"] / weights.sum()
    offset = rng.standard_normal(n_features)
    offset /= np.linalg.norm(offset)

    def rows(n_rows):
        active = rng.random((n_rows, n_true)) < probabilities
        magnitudes = rng.uniform(0.5, 1.5, size=(n_rows, n_true))
        X = (active * magnitudes) @ directions + offset
        X += config["noise"] * rng.standard_normal((n_rows, n_features))
        return X.astype(np.float32)

    return rows(config["rows"]), rows(config["test_rows"]), directions


def save_tiny_model(folder):
    """Save a random 4-block Llama with a character tokenizer to ``folder``."""
    save_character_llama(folder, corpora.pydoc_texts(), n_layers=4, hidden_size=32, seed=SEED)


def real_model(quick, scratch):
    """(name, model path, layer) of the real part's model, or None when none is installed.

    With ``quick``, a tiny random model is saved in the folder ``scratch``.
    """
    if quick:
        save_tiny_model(scratch)
        return "tiny random Llama (4 blocks, d_model 32)", scratch, QUICK_REAL["layer"]
    try:
        return "SmolLM2-135M", corpora.smollm2_path(), REAL["layer"]
    except ImportError as exc:
        print(f"SmolLM2-135M not available ({exc}); falling back to all-MiniLM-L6-v2")
    try:
        return "all-MiniLM-L6-v2", corpora.minilm_path(), REAL_FALLBACK_LAYER
    except ImportError as exc:
        print(f"all-MiniLM-L6-v2 not available either ({exc}); skipping the real part")
    return None


def real_texts(quick):
    texts = corpora.pydoc_texts()
    if quick:
        # Short documents, so that several of them make up the held-out rows.
        texts = [text[:300] for text in texts][: QUICK_CHARACTERS // 300]
    return texts


def load_activations(name, path, layer, config, output, refresh, quick):
    """Extract (or load from the cache) the activations and document index of each row."""
    tag = "".join(c if c.isalnum() else "-" for c in name.split(" ")[0])
    # The extractor's defaults decide which rows are kept (max_norm_ratio among them).
    ratio = ActivationExtractor().max_norm_ratio
    cache = output / f"activations_{tag}_layer{layer}_ctx{config['context_size']}_ratio{ratio}.npz"
    if cache.exists() and not refresh and not quick:
        with np.load(cache) as saved:
            print(f"activations loaded from {cache}")
            return saved["activations"], saved["doc_index"], None
    extractor = ActivationExtractor(
        model=path, layer=layer, context_size=config["context_size"], batch_size=8, device="cpu"
    )
    started = time.perf_counter()
    extraction = extractor.extract(real_texts(quick))
    seconds = time.perf_counter() - started
    print(
        f"extracted {extraction.activations.shape[0]} tokens in {seconds:.0f} s "
        f"({extractor.tokens_per_second_:.0f} tok/s, model load included in the wall time)"
    )
    if not quick:
        np.savez(cache, activations=extraction.activations, doc_index=extraction.doc_index)
        print(f"cached in {cache}")
    return extraction.activations, extraction.doc_index, seconds


def split_by_document(doc_index, test_tokens, seed=SEED):
    """Boolean mask of held-out rows: whole documents, in random order, ~``test_tokens``."""
    documents, counts = np.unique(doc_index, return_counts=True)
    held_out = []
    total = 0
    for i in np.random.default_rng(seed).permutation(len(documents)):
        # Skip documents that would overshoot by more than a third (the long ones).
        if total + counts[i] <= 4 * test_tokens / 3:
            held_out.append(documents[i])
            total += counts[i]
        if total >= test_tokens:
            break
    return np.isin(doc_index, held_out)


# ------------------------------------------------------------------------- fitting


def sweep_values(architecture, config):
    return config["l1"] if architecture == "reference" else config["grid"]


def make_estimator(architecture, value, n_components, config):
    if architecture == "reference":
        # The seed's fixed recipe, batch size included.
        params = dict(REFERENCE_PARAMS, batch_size=config["batch_size"])
    else:
        params = {"architecture": architecture}  # batch_size="auto", learning_rate=None
    params[KNOBS[architecture]] = value
    return SparseAutoencoder(
        n_components=n_components,
        max_iter=config["epochs"],
        device="cpu",
        random_state=SEED,
        **params,
    )


def mean_max_cosine(directions, components):
    """Mean over the true directions of the best cosine similarity with a learned row."""
    learned = components / np.linalg.norm(components, axis=1, keepdims=True).clip(1e-12)
    truth = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    return float((truth @ learned.T).max(axis=1).mean())


def fit_point(architecture, value, X_train, X_test, n_components, config, directions=None):
    """Fit one SAE and measure it; returns a result dict (``error`` set when the fit failed)."""
    sae = make_estimator(architecture, value, n_components, config)
    result = {"architecture": architecture, "knob": KNOBS[architecture], "value": value}
    start, start_cpu, start_busy = time.perf_counter(), time.process_time(), busy_cpu_seconds()
    try:
        sae.fit(X_train)
    except ValueError as exc:  # TrainingDivergedError included
        result["error"] = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - start
    cpu = time.process_time() - start_cpu
    busy = busy_cpu_seconds()
    result["seconds"] = wall
    result["tokens_per_second"] = X_train.shape[0] * config["epochs"] / wall
    result["others"] = (
        None if busy is None else max(0.0, busy - start_busy - cpu) / (wall * os.cpu_count())
    )
    if "error" in result:
        return result
    codes = sae.transform(X_test)
    result["l0"] = mean_l0(codes)
    result["target"] = None if architecture == "reference" else value
    result["explained_variance"] = sae.score(X_test)
    result["dead_train"] = sae.dead_fraction_
    result["dead_held_out"] = dead_fraction(codes)
    result["coefficient"] = getattr(sae, "sparsity_coefficient_", None)
    result["train_l0"] = float(sae.latent_frequency_.sum())
    result["learning_rate"] = sae.learning_rate_
    result["batch_size"] = sae.batch_size_
    if directions is not None:
        result["cosine"] = mean_max_cosine(directions, sae.components_)
    return result


def run_sweeps(X_train, X_test, n_components, config, architectures, directions=None):
    results = []
    for architecture in architectures:
        for value in sweep_values(architecture, config):
            result = fit_point(
                architecture, value, X_train, X_test, n_components, config, directions
            )
            results.append(result)
            status = result.get("error") or (
                f"L0 {result['l0']:.2f}, EV {result['explained_variance']:.3f}"
            )
            print(
                f"  {architecture:<10} {KNOBS[architecture]}={value:<5} "
                f"{result['seconds']:6.1f} s  {status}",
                flush=True,
            )
    return results


# ------------------------------------------------------------------------ reporting


def _format(value, spec, width):
    return f"{'n/a' if value is None else format(value, spec):>{width}}"


def print_table(results, with_cosine):
    header = (
        f"{'arch':<10} {'knob':<14} {'value':>6} {'L0':>7} {'L0/tgt':>6} {'EV':>6} "
        f"{'dead':>5} {'dead(ho)':>8} " + (f"{'cos':>5} " if with_cosine else "") + f"{'coef':>8} "
        f"{'tok/s':>7} {'fit s':>6} {'others':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['architecture']:<10} {r['knob']:<14} {r['value']:>6g} FAILED: {r['error']}")
            continue
        ratio = None if r["target"] is None else r["l0"] / r["target"]
        print(
            f"{r['architecture']:<10} {r['knob']:<14} {r['value']:>6g} {r['l0']:>7.2f} "
            f"{_format(ratio, '.2f', 6)} {r['explained_variance']:>6.3f} "
            f"{r['dead_train']:>5.2f} {r['dead_held_out']:>8.2f} "
            + (f"{r['cosine']:>5.3f} " if with_cosine else "")
            + f"{_format(r['coefficient'], '.3g', 8)} {r['tokens_per_second']:>7.0f} "
            f"{r['seconds']:>6.1f} {_format(r['others'], '.0%', 6)}"
        )


def print_notes(results):
    """Fits that failed, missed their L0 target by more than 10%, or left dead latents."""
    notes = []
    for r in results:
        name = f"{r['architecture']} {r['knob']}={r['value']:g}"
        if "error" in r:
            notes.append(f"{name}: failed ({r['error']})")
            continue
        if r["target"] is not None and abs(r["l0"] / r["target"] - 1) > 0.1:
            notes.append(
                f"{name}: held-out L0 {r['l0']:.2f} misses the target by "
                f"{r['l0'] / r['target'] - 1:+.0%} (last training pass: {r['train_l0']:.2f})"
            )
        if r["dead_train"] > 0.05:
            notes.append(f"{name}: {r['dead_train']:.0%} of the latents dead in training")
        if r["others"] is not None and r["others"] > 0.1:
            notes.append(f"{name}: other processes used {r['others']:.0%} of the CPUs (tok/s low)")
    for note in notes or ["none"]:
        print(f"note: {note}")
    print()


def interpolate_at(results, architecture, metric, l0):
    """``metric`` at ``l0``, linear in log L0 between sweep points; None outside the sweep."""
    points = sorted(
        (math.log(r["l0"]), r[metric])
        for r in results
        if r["architecture"] == architecture and "error" not in r and r["l0"] > 0
    )
    if len(points) < 1:
        return None
    x, y = np.array(points).T
    target = math.log(l0)
    if target < x[0] or target > x[-1]:
        return None
    return float(np.interp(target, x, y))


def print_comparison(results, common_l0, metrics):
    """Each architecture's metrics at each common L0, and the difference to ``reference``."""
    architectures = list(dict.fromkeys(r["architecture"] for r in results))
    for metric, label in metrics:
        cells = "".join(f" {l0:>6g} {'(diff)':>8}" for l0 in common_l0)
        header = f"{label + ' at L0 =':<16}{cells}"
        print(header)
        print("-" * len(header))
        for architecture in architectures:
            cells = []
            for l0 in common_l0:
                value = interpolate_at(results, architecture, metric, l0)
                reference = interpolate_at(results, "reference", metric, l0)
                diff = None if value is None or reference is None else value - reference
                cells.append(f" {_format(value, '.3f', 6)} {_format(diff, '+.3f', 8)}")
            print(f"{architecture:<16}" + "".join(cells))
        print()


def plot_frontier(results, metrics, title, path):
    """One panel per metric against L0 (log axis), one line per architecture; saves a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'skSAE[plot]')")
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    architectures = list(dict.fromkeys(r["architecture"] for r in results))
    for ax, (metric, label) in zip(axes[0], metrics, strict=True):
        for architecture in architectures:
            points = sorted(
                (r["l0"], r[metric])
                for r in results
                if r["architecture"] == architecture and "error" not in r and r["l0"] > 0
            )
            if not points:
                continue
            l0, value = zip(*points, strict=True)
            style = "o--" if architecture == "reference" else "o-"
            color = "black" if architecture == "reference" else None
            ax.plot(l0, value, style, color=color, label=architecture)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (mean active latents per held-out row)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"plot saved to {path}")


# ----------------------------------------------------------------------------- parts


def run_synthetic(args, output):
    config = QUICK_SYNTHETIC if args.quick else SYNTHETIC
    X_train, X_test, directions = make_synthetic(config)
    chance = mean_max_cosine(
        directions, np.random.default_rng(SEED + 1).standard_normal(directions.shape)
    )
    print(
        f"\n== synthetic: D={config['n_features']}, {config['n_true']} true directions, "
        f"n_components={config['n_components']}, {X_train.shape[0]} training rows, "
        f"{X_test.shape[0]} held-out rows, reference batch {config['batch_size']}, "
        f"{config['epochs']} epochs =="
    )
    print(
        f"true L0 of the held-out rows {config['mean_active']:.1f} expected; "
        f"cos of a random dictionary: {chance:.3f}"
    )
    results = run_sweeps(
        X_train, X_test, config["n_components"], config, args.architecture, directions
    )
    print()
    print_table(results, with_cosine=True)
    print()
    print_notes(results)
    metrics = [("explained_variance", "EV"), ("cosine", "cos")]
    print_comparison(results, config["grid"][1:-1] or config["grid"], metrics)
    plot_frontier(
        results,
        [("explained_variance", "variance explained (held out)"), ("cosine", "ground-truth cos")],
        f"synthetic: D={config['n_features']}, {config['n_true']} true directions, "
        f"{config['n_components']} latents",
        output / "frontier_synthetic.png",
    )
    return {"config": config, "chance_cosine": chance, "results": results}


def run_real(args, output):
    config = QUICK_REAL if args.quick else REAL
    with tempfile.TemporaryDirectory(prefix="bench_frontier_") as scratch:
        model = real_model(args.quick, scratch)
        if model is None:
            return None
        return run_real_on(model, config, args, output)


def run_real_on(model, config, args, output):
    """The real part on ``model``, a (name, path, layer) tuple."""
    name, path, layer = model
    print(f"\n== real: {name}, block {layer} resid_post, pydoc topics ==")
    activations, doc_index, extraction_seconds = load_activations(
        name, path, layer, config, output, args.refresh, args.quick
    )
    held_out = split_by_document(doc_index, config["test_tokens"])
    X_train, X_test = activations[~held_out], activations[held_out]
    n_components = config["expansion_factor"] * activations.shape[1]
    print(
        f"d_model {activations.shape[1]}, n_components={n_components}, "
        f"{X_train.shape[0]} training rows ({len(np.unique(doc_index[~held_out]))} documents), "
        f"{X_test.shape[0]} held-out rows ({len(np.unique(doc_index[held_out]))} documents), "
        f"batch {config['batch_size']}, {config['epochs']} epochs"
    )
    results = run_sweeps(X_train, X_test, n_components, config, args.architecture)
    print()
    print_table(results, with_cosine=False)
    print()
    print_notes(results)
    common_l0 = config["grid"][1:-1] or config["grid"]
    print_comparison(results, common_l0, [("explained_variance", "EV")])
    plot_frontier(
        results,
        [("explained_variance", "variance explained (held out)")],
        f"{name}, block {layer}: {n_components} latents",
        output / "frontier_real.png",
    )
    return {
        "config": config,
        "model": name,
        "layer": layer,
        "n_components": n_components,
        "train_rows": int(X_train.shape[0]),
        "test_rows": int(X_test.shape[0]),
        "extraction_seconds": extraction_seconds,
        "results": results,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--synthetic-only", action="store_true")
    part.add_argument("--real-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--refresh", action="store_true", help="extract the real activations again")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "output",
        help="folder for the plots, results and cached activations",
    )
    parser.add_argument(
        "--architecture", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    print("skSAE frontier benchmark: L0 against variance explained, per architecture")
    print(
        f"skSAE {skSAE.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}, device cpu, {os.cpu_count()} CPUs, "
        f"torch.get_num_threads()={torch.get_num_threads()}"
    )
    print(
        f"load average at start: {os.getloadavg()[0]:.2f} over {os.cpu_count()} CPUs "
        "(tok/s is unreliable when other processes are busy; see the others column)"
    )
    print(f"random_state={SEED}; reference = {REFERENCE_PARAMS}, swept over l1_coefficient")
    start = time.perf_counter()
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick}
    if not args.real_only:
        report["synthetic"] = run_synthetic(args, args.output)
    if not args.synthetic_only:
        report["real"] = run_real(args, args.output)
    total = time.perf_counter() - start
    report["seconds"] = total
    path = args.output / ("frontier_quick.json" if args.quick else "frontier.json")
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"results saved to {path}")
    print(f"\ntotal {total:.0f} s, load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
