"""Held-out against training quality at several layers: the main job's fit, per architecture.

For each block of SmolLM2-135M-Instruct (`skSAE.corpora.smollm2_path`), extracts the
main job's training and held-out texts once (``python -m skSAE``'s split of the
pydoc texts at its defaults: about 100k training tokens, 4k held out, whole texts; the
extractor's defaults, so the first position of each context and the outlier-norm
tokens are dropped), then fits every architecture as the main job does (its
``max_iter``, ``expansion_factor=8``, ``k=32`` or ``target_l0=32``, everything else
the library's defaults, ``random_state=0``) and prints, per fit: the training
explained variance (``score`` on the training rows), the held-out one, their gap, the
held-out L0, the dead fraction and the fit time. A large gap means the model does not generalise
from the training rows to new text.

Run from the repository root::

    python benchmarks/bench_layers.py                       # blocks 6, 12 and 20
    python benchmarks/bench_layers.py --layers 12 --architectures topk batchtopk
    python benchmarks/bench_layers.py --tokens 40000 --max-iter 5   # the old main job
    python benchmarks/bench_layers.py --quick               # tiny random model, seconds
"""

import argparse
import os
import platform
import tempfile
import time
import warnings

import numpy as np
import torch
from _shared import save_character_llama

import skSAE
from skSAE import ActivationExtractor, SparseAutoencoder, corpora
from skSAE._architectures import ARCHITECTURES
from skSAE._main_job import parse_args
from skSAE.corpora import split_texts
from skSAE.metrics import mean_l0

SEED = 0
ORDER = ("topk", "batchtopk", "matryoshka", "jumprelu", "gated", "relu")
QUICK_TOKENS, QUICK_HELD_OUT_TOKENS = 600, 300


def fit_one(architecture, X_train, X_test, k, max_iter):
    params = dict(architecture=architecture, expansion_factor=8, max_iter=max_iter)
    if ARCHITECTURES[architecture].coefficient_name is None:
        params["k"] = k
    else:
        params["target_l0"] = k
    sae = SparseAutoencoder(**params, device="cpu", random_state=SEED)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X_train)
    seconds = time.perf_counter() - started
    train, test = sae.score(X_train), sae.score(X_test)
    return {
        "train": train,
        "test": test,
        "gap": train - test,
        "l0": mean_l0(sae.transform(X_test)),
        "dead": sae.dead_fraction_,
        "seconds": seconds,
        "steps": sae.n_steps_,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12, 20])
    parser.add_argument(
        "--architectures", nargs="+", default=list(ORDER), choices=sorted(ARCHITECTURES)
    )
    main_job = parse_args([])
    parser.add_argument(
        "--tokens", type=int, default=main_job.tokens, help="training tokens (the main job's)"
    )
    parser.add_argument(
        "--max-iter", type=int, default=main_job.max_iter, help="passes (the main job's)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny random model, for a smoke test")
    args = parser.parse_args(argv)
    print(
        f"skSAE {skSAE.__version__}, torch {torch.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )
    texts = corpora.pydoc_texts()
    with tempfile.TemporaryDirectory(prefix="bench_layers_") as scratch:
        if args.quick:
            save_character_llama(scratch, texts, n_layers=2, hidden_size=16, seed=SEED)
            model, layers, k, max_iter = scratch, [1], 4, 1
            tokens, held_out = QUICK_TOKENS, QUICK_HELD_OUT_TOKENS
        else:
            model, layers, k, max_iter = corpora.smollm2_path(), args.layers, 32, args.max_iter
            tokens, held_out = args.tokens, main_job.held_out_tokens
        # Characters: about 4 per token of English (the main job's rule); the
        # character model of the smoke test has one token per character.
        per_token = 1 if args.quick else 4
        train_texts, test_texts = split_texts(texts, tokens * per_token, held_out * per_token)
        print(
            f"{'block':>5} {'architecture':<12} {'train EV':>8} {'held-out':>8} {'gap':>6} "
            f"{'L0':>6} {'dead':>6} {'steps':>6} {'fit s':>6}"
        )
        for layer in layers:
            extractor = ActivationExtractor(model, layer=layer, device="cpu", verbose=1)
            X_train = extractor.transform(train_texts)
            X_test = extractor.transform(test_texts)
            for architecture in args.architectures:
                r = fit_one(architecture, X_train, X_test, k, max_iter)
                print(
                    f"{layer:>5} {architecture:<12} {r['train']:>8.3f} {r['test']:>8.3f} "
                    f"{r['gap']:>6.3f} {r['l0']:>6.1f} {r['dead']:>6.3f} {r['steps']:>6} "
                    f"{r['seconds']:>6.0f}",
                    flush=True,
                )
            print(f"      ({X_train.shape[0]} training, {X_test.shape[0]} held-out rows)")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
