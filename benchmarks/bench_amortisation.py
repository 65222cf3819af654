"""The amortisation gap of a TopK SAE: its encoder against sparse solvers on its dictionary.

Fits skSAE's TopK SAE the way ``bench_peers.py`` does (``SparseAutoencoder(
architecture="topk", k=32, n_components=8 * D, max_iter=8, random_state=0)``, the
library's defaults otherwise) on the synthetic set of ``bench_peers.py`` (the
generator of ``bench_frontier.make_synthetic``: D=128, 1024 true directions, 16 on
per row, 65,536 training and 8192 held-out rows), then codes the held-out rows with
`amortisation_gap`: the encoder, and `sklearn.decomposition.sparse_encode`'s OMP
(at the encoder's mean L0, rounded), lasso_lars and threshold (each at the alpha
whose L0 on 256 held-out rows matches the encoder's) on the learned
``components_``. Prints the mean L0, the variance explained (FVE, as
``SparseAutoencoder.score``) and the mean cosine similarity of each, and, on the first
2048 held-out rows with the settings the table used, the share of the non-zero codes
that are negative (the solvers' codes are unconstrained, the encoder's non-negative)
and the time of ``transform``, scaled to 10,000 rows.

Run from the repository root::

    python benchmarks/bench_amortisation.py           # a few minutes on 2 cores
    python benchmarks/bench_amortisation.py --quick   # smoke test, seconds
"""

import argparse
import copy
import os
import platform
import time

import bench_peers
import sklearn
import torch
from bench_frontier import make_synthetic

import skSAE
from skSAE import SparseAutoencoder
from skSAE.evaluation import amortisation_gap

TIMED_ROWS, QUICK_TIMED_ROWS = 2048, 256


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke test")
    return parser.parse_args(argv)


def timed_transform(sae, row, X):
    """Seconds of ``transform`` on ``X`` with ``row``'s settings per 10,000 rows, and
    the share of its non-zero codes that are negative."""
    solver = copy.copy(sae).set_params(
        transform_algorithm=row["algorithm"],
        transform_n_nonzero_coefs=row["n_nonzero_coefs"],
        transform_alpha=row["alpha"],
    )
    solver.transform(X[:8])  # first calls (imports, torch) out of the timing
    start = time.perf_counter()
    codes = solver.transform(X)
    seconds = (time.perf_counter() - start) * 10_000 / X.shape[0]
    return seconds, (codes < 0).sum() / max(1, (codes != 0).sum())


def main(argv=None):
    args = parse_args(argv)
    config = bench_peers.QUICK_SYNTHETIC if args.quick else bench_peers.SYNTHETIC
    k = bench_peers.QUICK_K if args.quick else bench_peers.K
    passes = bench_peers.QUICK_PASSES if args.quick else bench_peers.PASSES
    timed_rows = QUICK_TIMED_ROWS if args.quick else TIMED_ROWS
    X_train, X_test, _ = make_synthetic(config, seed=bench_peers.SEED)
    n_components = bench_peers.EXPANSION * X_train.shape[1]

    print("The amortisation gap: a TopK SAE's encoder against sparse solvers on its dictionary")
    print(
        f"skSAE {skSAE.__version__}, torch {torch.__version__}, scikit-learn "
        f"{sklearn.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"torch.get_num_threads()={torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(
        f"synthetic (bench_peers): D={config['n_features']}, {config['n_true']} true "
        f"directions, {config['mean_active']} on per row, noise {config['noise']}, "
        f"{X_train.shape[0]} train / {X_test.shape[0]} held-out rows"
    )
    print(
        f"load average at start: {os.getloadavg()[0]:.2f} over {os.cpu_count()} CPUs "
        "(the seconds are wall-clock figures)"
    )
    started = time.perf_counter()
    sae = SparseAutoencoder(
        architecture="topk",
        k=k,
        n_components=n_components,
        max_iter=passes,
        random_state=bench_peers.SEED,
    ).fit(X_train)
    fit_seconds = time.perf_counter() - started
    print(
        f"TopK k={k}, n_components={n_components}, max_iter={passes}, defaults otherwise: "
        f"fit in {fit_seconds:.0f} s"
    )
    started = time.perf_counter()
    results = amortisation_gap(sae, X_test)
    gap_seconds = time.perf_counter() - started
    print(f"amortisation_gap on the {X_test.shape[0]} held-out rows in {gap_seconds:.0f} s\n")
    header = (
        f"{'algorithm':<11} {'setting':<16} {'L0':>6} {'FVE':>7} {'cosine':>7} "
        f"{'negative':>8} {'s / 10k rows':>13}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        if row["n_nonzero_coefs"] is not None:
            setting = f"atoms {row['n_nonzero_coefs']}"
        elif row["alpha"] is not None:
            setting = f"alpha {row['alpha']:.4g}"
        else:
            setting = "-"
        seconds, negative = timed_transform(sae, row, X_test[:timed_rows])
        print(
            f"{row['algorithm']:<11} {setting:<16} {row['mean_l0']:>6.1f} "
            f"{row['explained_variance']:>7.3f} {row['cosine_similarity']:>7.3f} "
            f"{negative:>8.0%} {seconds:>13.2f}"
        )
    encoder = results[0]
    best = max(results[1:], key=lambda row: row["explained_variance"])
    print(
        f"\ngap: {best['algorithm']} explains {best['explained_variance']:.3f} of the "
        f"variance at L0 {best['mean_l0']:.1f}, the encoder {encoder['explained_variance']:.3f}"
        f" at L0 {encoder['mean_l0']:.1f}"
    )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
