"""Batch size and learning rate per token budget: the sweep behind ``batch_size="auto"``.

For each token budget (training rows x passes) and dictionary width, fits one TopK
`SparseAutoencoder` per (batch size, learning rate) of a grid, with the library's
defaults (``batch_size="auto"``, ``learning_rate=None``) and the old ones
(``batch_size=4096``, ``2e-4 / sqrt(n_components / 2**14)``) among them, and measures each
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
columns learning rates (``None`` is the default, ``0.3 / sqrt(steps)``; ``old`` the
old width-scaled default ``2e-4 / sqrt(n_components / 2**14)``), cells ``FVE/MMCS``; a
second table gives ``>0.9/dead``. The last row, ``auto``, is ``batch_size="auto"``
(left out when the grid has its value: then the defaults are that row's ``None``).
Below them, the best (batch, lr) by FVE and by MMCS and how far the
defaults are from each. All results go to ``budget.json`` in the output folder
(default ``benchmarks/output/``, ignored by git), rewritten after every fit.

Run from the repository root::

    python benchmarks/bench_budget.py           # the full grid (see GRID below)
    python benchmarks/bench_budget.py --tables 5 6  # only the 1M-token tables
    python benchmarks/bench_budget.py --data smollm2  # SmolLM2 block-6 activations
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
from bench_frontier import load_activations, make_synthetic, split_by_document

import skSAE
from skSAE import SparseAutoencoder, corpora
from skSAE._recipe import auto_batch_size, default_learning_rate

SEED = 0
OLD_BATCH = 4096  # the defaults before batch_size="auto" (issue 11)
OLD = "old"  # the old default learning rate, 2e-4 / sqrt(n_components / 2**14)
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
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, OLD, None)
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
QUICK_GRID = ((2000, 2, 64, (64, 4096), (OLD, None)),)
# SmolLM2-135M block-6 activations of the pydoc texts (D=576; bench_peers' real set),
# TopK k=32 at 8 * D latents, the main job's shape; whole documents held out.
REAL = {"layer": 6, "context_size": 128, "test_tokens": 10_000, "k": 32}
# One budget: a fit of 4608 latents takes 0.5-2 min on 2 cores.
REAL_GRID = ((100_000, 2, 4608, (256, 1024, 4096), (2e-3, 6e-3, 2e-2, OLD, None)),)


def old_learning_rate(n_components):
    return 2e-4 / math.sqrt(n_components / 2**14)


def mean_max_cosine(directions, components):
    """(mean best cosine of each true direction, fraction of them above 0.9); NaN without."""
    if directions is None:
        return float("nan"), float("nan")
    learned = components / np.linalg.norm(components, axis=1, keepdims=True).clip(1e-12)
    best = (directions @ learned.T).max(axis=1)
    return float(best.mean()), float((best > 0.9).mean())


def fit_point(X_train, X_test, directions, *, passes, n_components, k, batch_size, lr):
    sae = SparseAutoencoder(
        architecture="topk",
        k=k,
        n_components=n_components,
        batch_size=batch_size,
        learning_rate=old_learning_rate(n_components) if lr == OLD else lr,
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
        "learning_rate_used": sae.learning_rate_ if error is None else float("nan"),
        "fve": fve,
        "mmcs": mmcs,
        "matched": matched,
        "dead": dead,
        "batch_size_used": sae.batch_size_ if error is None else batch_size,
        "auto_batch_size": min(auto_batch_size(X_train.shape[0] * passes), X_train.shape[0]),
        "steps": sae.n_steps_ if error is None else -1,
        "seconds": seconds,
        "error": error,
        "warnings": sorted({type(w.message).__name__ for w in caught}),
    }


def lr_label(lr):
    return "None" if lr is None else lr if lr == OLD else f"{lr:g}"


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
    old = cell.get((OLD_BATCH, OLD))
    auto = points[0]["auto_batch_size"]
    new = cell.get(("auto", None), cell.get((auto, None)))
    for metric in ("fve", "mmcs"):
        if all(math.isnan(p[metric]) for p in points):
            continue
        best = max(points, key=lambda p: -math.inf if p["error"] else p[metric])
        line = (
            f"best by {metric.upper()}: batch {best['batch_size']}, lr "
            f"{lr_label(best['learning_rate'])} ({best['steps']} steps): {best[metric]:.3f}"
        )
        for label, p in (("defaults", new), ("old defaults", old)):
            if p is not None:
                line += (
                    f"; {label} (batch {p['batch_size_used']}, lr {p['learning_rate_used']:.3g}, "
                    f"{p['steps']} steps): {p[metric]:.3f} ({p[metric] - best[metric]:+.3f})"
                )
        print(line)
    seconds = sum(p["seconds"] for p in points)
    tokens = sum(p["rows"] * p["passes"] for p in points)
    print(f"fit wall time of this table: {seconds:.0f} s ({tokens / seconds:.0f} tok/s)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument(
        "--data",
        choices=("synthetic", "smollm2"),
        default="synthetic",
        help="synthetic with ground truth (default) or SmolLM2-135M block-6 activations",
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "output")
    parser.add_argument(
        "--tables",
        type=int,
        nargs="+",
        help="run only these tables of the grid (1-based, in GRID order); same data",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.data = "synthetic"
    data, grid = (QUICK_DATA, QUICK_GRID) if args.quick else (DATA, GRID)
    if args.data == "smollm2":
        data, grid = REAL, REAL_GRID
    # The data is drawn at the largest row count of the whole grid, so that a
    # selection of tables sees the same training and held-out rows as the full run.
    max_rows = max(rows for rows, *_ in grid)
    name = "budget_quick" if args.quick else f"budget_{args.data}"
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
    if args.data == "smollm2":
        activations, doc_index, _ = load_activations(
            "SmolLM2", corpora.smollm2_path(), data["layer"], data, args.output, False, False
        )
        held_out = split_by_document(doc_index, data["test_tokens"])
        X_all = activations[~held_out].astype(np.float32)
        X_test = activations[held_out].astype(np.float32)
        directions = None
        print(
            f"SmolLM2-135M block {data['layer']}, pydoc texts: D={X_all.shape[1]}, "
            f"{X_all.shape[0]} training rows (the first rows of each budget), "
            f"{X_test.shape[0]} held-out rows (whole documents), k={data['k']}"
        )
    else:
        X_all, X_test, directions = make_synthetic({**data, "rows": max_rows}, seed=SEED)
        print(
            f"synthetic: D={data['n_features']}, {data['n_true']} true directions, mean true "
            f"L0 {data['mean_active']:g}, k={data['k']}, {X_test.shape[0]} held-out rows "
            f"(drawn in {time.perf_counter() - started:.0f} s)"
        )
    results = []
    for rows, passes, n_components, batches, lrs in grid:
        auto = min(auto_batch_size(rows * passes), rows)
        print(
            f"\n== {rows} rows x {passes} passes = {rows * passes} tokens, "
            f"n_components={n_components} (old default lr {old_learning_rate(n_components):.3g}; "
            f"batch_size='auto' = {auto}, lr None = "
            f"{default_learning_rate(passes * math.ceil(rows / auto), X_all.shape[1]):.3g} there)"
        )
        if auto not in batches:
            batches = (*batches, "auto")
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
