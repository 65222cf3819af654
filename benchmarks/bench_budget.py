"""Batch size and learning rate per token budget: the sweep behind ``batch_size="auto"``.

For each token budget (training rows x passes) and dictionary width, fits one TopK
`SparseAutoencoder` per (batch size, learning rate) of a grid, the library's current
defaults (``batch_size=4096``, ``learning_rate=None``) among them, and measures each
fit on held-out rows. Quality per training token is the point: every fit of one
table sees the same rows the same number of times, and only the batch size (so
the number of optimiser steps) and the learning rate change.

Data: the synthetic generator of ``bench_frontier.py`` (`make_synthetic`, imported):
``n_true`` random unit directions in ``D`` dimensions, direction ``i`` on in a row
with probability proportional to ``(i + 1) ** -0.5`` (power-law firing), magnitudes
uniform in [0.5, 1.5], noise 0.02 per coordinate, a fixed offset of norm 1. Default
``D=64``, 512 true directions, 8 on per row on average, ``k=8``. One training set is
drawn at the largest row count; smaller budgets take its first rows. The held-out
rows (8192) are drawn after it from the same generator and never trained on.

Per fit: ``FVE`` (held-out variance explained, ``sae.score``), ``MMCS`` (mean over
the true directions of the best cosine with a row of ``components_``), ``>0.9``
(fraction of true directions with a learned match above 0.9), ``dead``
(``sae.dead_fraction_``), ``steps`` (optimiser steps, ``ceil(rows / batch) * passes``)
and the fit's wall time (a fit that raises, e.g. on divergence, prints ``diverged``).

One table per (budget, width): rows are batch sizes (with their step counts),
columns learning rates (``None`` is the current width-scaled default,
``2e-4 / sqrt(n_components / 2**14)``), cells ``FVE/MMCS``; a second table gives
``>0.9/dead``. Below them, the best (batch, lr) by FVE and by MMCS and how far the
defaults are from each. All results go to ``budget.json`` in the output folder
(default ``benchmarks/output/``, ignored by git), rewritten after every fit.

Run from the repository root::

    python benchmarks/bench_budget.py           # the full grid (see GRID below)
    python benchmarks/bench_budget.py --tables 5 6  # only the 1M-token tables
    python benchmarks/bench_budget.py --quick   # tiny smoke test, seconds
"""

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_frontier import make_synthetic

import skSAE
from skSAE import SparseAutoencoder

SEED = 0
DEFAULT_BATCH = 4096  # the library's current default batch_size
DATA = {
    "n_features": 64,
    "n_true": 512,
    "mean_active": 8.0,
    "noise": 0.02,
    "test_rows": 8192,
    "k": 8,
}
# (rows, passes, n_components, batch sizes, learning rates); None is the default lr.
# Ordered by budget, so that a run stopped early has the small budgets at both widths.
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, None)
GRID = (
    (20_000, 10, 512, (128, 256, 512, 1024, 4096), LRS),
    (20_000, 10, 2048, (128, 256, 512, 1024, 4096), LRS),
    (200_000, 2, 512, (128, 256, 512, 1024, 2048, 4096), LRS),
    (200_000, 2, 2048, (256, 512, 1024, 2048, 4096), LRS),
    # The largest budget on a smaller grid: a 1M-token fit takes 5-60 s on 2 shared cores.
    (1_000_000, 1, 512, (512, 2048, 4096), (3e-3, 1e-2, 3e-2, None)),
    (1_000_000, 1, 2048, (512, 2048, 4096), (3e-3, 1e-2, 3e-2, None)),
)
QUICK_DATA = {**DATA, "n_features": 16, "n_true": 32, "mean_active": 3.0, "test_rows": 512, "k": 3}
QUICK_GRID = ((2000, 2, 64, (64, 256, 4096), (3e-3, None)),)


def mean_max_cosine(directions, components):
    """(mean best cosine of each true direction, fraction of them above 0.9)."""
    learned = components / np.linalg.norm(components, axis=1, keepdims=True).clip(1e-12)
    best = (directions @ learned.T).max(axis=1)
    return float(best.mean()), float((best > 0.9).mean())


def fit_point(X_train, X_test, directions, *, passes, n_components, k, batch_size, lr):
    sae = SparseAutoencoder(
        architecture="topk",
        k=k,
        n_components=n_components,
        batch_size=batch_size,
        learning_rate=lr,
        max_iter=passes,
        device="cpu",
        random_state=SEED,
    )
    start = time.perf_counter()
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sae.fit(X_train)
        except ValueError as exc:  # TrainingDivergedError included
            error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    if error is None:
        mmcs, matched = mean_max_cosine(directions, sae.components_)
        fve, dead = float(sae.score(X_test)), float(sae.dead_fraction_)
    else:  # a failed fit counts as the worst cell of its table
        mmcs = matched = fve = dead = float("nan")
    return {
        "rows": X_train.shape[0],
        "passes": passes,
        "n_components": n_components,
        "batch_size": batch_size,
        "learning_rate": lr,
        "learning_rate_used": lr if lr is not None else 2e-4 / math.sqrt(n_components / 2**14),
        "fve": fve,
        "mmcs": mmcs,
        "matched": matched,
        "dead": dead,
        "steps": math.ceil(X_train.shape[0] / min(batch_size, X_train.shape[0])) * passes,
        "seconds": seconds,
        "error": error,
        "warnings": sorted({type(w.message).__name__ for w in caught}),
    }


def lr_label(lr):
    return "None" if lr is None else f"{lr:g}"


def print_tables(points, batches, lrs):
    """The FVE/MMCS and >0.9/dead tables of one (budget, width), and the best cells."""
    cell = {(p["batch_size"], p["learning_rate"]): p for p in points}
    header = f"{'batch':>6} {'steps':>6} " + " ".join(f"{lr_label(lr):>12}" for lr in lrs)
    for title, first, second in (("FVE/MMCS", "fve", "mmcs"), (">0.9/dead", "matched", "dead")):
        print(f"-- {title}")
        print(header)
        for batch in batches:
            row = [cell[batch, lr] for lr in lrs]
            values = " ".join(
                f"{'diverged':>12}" if p["error"] else f"{p[first]:>6.3f}/{p[second]:<5.3f}"
                for p in row
            )
            print(f"{batch:>6} {row[0]['steps']:>6} {values}")
    default = cell[DEFAULT_BATCH, None]
    for metric in ("fve", "mmcs"):
        best = max(points, key=lambda p: -math.inf if p["error"] else p[metric])
        print(
            f"best by {metric.upper()}: batch {best['batch_size']}, lr "
            f"{lr_label(best['learning_rate'])} ({best['steps']} steps): {best[metric]:.3f}; "
            f"defaults (batch {DEFAULT_BATCH}, lr None, {default['steps']} steps): "
            f"{default[metric]:.3f} ({default[metric] - best[metric]:+.3f})"
        )
    seconds = sum(p["seconds"] for p in points)
    tokens = sum(p["rows"] * p["passes"] for p in points)
    print(f"fit wall time of this table: {seconds:.0f} s ({tokens / seconds:.0f} tok/s)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "output")
    parser.add_argument(
        "--tables",
        type=int,
        nargs="+",
        help="run only these tables of the grid (1-based, in GRID order); same data",
    )
    args = parser.parse_args(argv)
    data, grid = (QUICK_DATA, QUICK_GRID) if args.quick else (DATA, GRID)
    # The data is drawn at the largest row count of the whole grid, so that a
    # selection of tables sees the same training and held-out rows as the full run.
    max_rows = max(rows for rows, *_ in grid)
    name = "budget_quick" if args.quick else "budget"
    if args.tables:
        grid = [grid[i - 1] for i in args.tables]
        name += "_tables-" + "-".join(str(i) for i in args.tables)
    args.output.mkdir(parents=True, exist_ok=True)
    out_file = args.output / f"{name}.json"
    print(
        f"skSAE {skSAE.__version__}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, "
        f"torch.get_num_threads()={torch.get_num_threads()}"
    )
    started = time.perf_counter()
    X_all, X_test, directions = make_synthetic({**data, "rows": max_rows}, seed=SEED)
    print(
        f"synthetic: D={data['n_features']}, {data['n_true']} true directions, mean true L0 "
        f"{data['mean_active']:g}, k={data['k']}, {X_test.shape[0]} held-out rows "
        f"(drawn in {time.perf_counter() - started:.0f} s)"
    )
    results = []
    for rows, passes, n_components, batches, lrs in grid:
        print(
            f"\n== {rows} rows x {passes} passes = {rows * passes} tokens, "
            f"n_components={n_components} (default lr "
            f"{2e-4 / math.sqrt(n_components / 2**14):.3g})"
        )
        points = []
        for batch in batches:
            for lr in lrs:
                point = fit_point(
                    X_all[:rows],
                    X_test,
                    directions,
                    passes=passes,
                    n_components=n_components,
                    k=data["k"],
                    batch_size=batch,
                    lr=lr,
                )
                points.append(point)
                results.append(point)
                out_file.write_text(json.dumps({"data": data, "results": results}, indent=1))
        print_tables(points, batches, lrs)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; results in {out_file}")


if __name__ == "__main__":
    main()
