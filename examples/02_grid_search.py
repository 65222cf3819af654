"""Model selection from text: GridSearchCV over SAE sparsity on L0, variance and loss recovered.
=============================================================================================

A `Pipeline([ActivationExtractor, SparseAutoencoder])` takes texts (Python's pydoc
topics) and is searched over ``l1_coefficient`` (ReLU) and ``k`` (TopK). Folds split
by text, so no context is on both sides. Every candidate is scored on L0, variance
explained and loss recovered (SmolLM2-135M, block 6), the pick is the best loss
recovered within an L0 budget (`pareto_refit`), and the L0 vs loss-recovered frontier
is plotted. The extractor's ``memory`` caches activations and the clean/ablated
cross-entropies on disk, so candidates after the first reuse them.

The refitted pipeline is saved with joblib, reloaded and reused on new text.

Run from the repository root (offline; a few minutes on 2 CPU cores)::

    python examples/02_grid_search.py
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from skSAE import ActivationExtractor, SparseAutoencoder, corpora
from skSAE.metrics import mean_l0, pareto_refit, plot_frontier, sae_scoring


def pick_texts(n_chars, offset=0):
    """Consecutive pydoc topics of about ``n_chars`` characters, from ``offset``."""
    texts, total = [], 0
    for text in corpora.pydoc_texts()[offset:]:
        texts.append(text[:4000])  # many short texts: folds split by text
        total += len(texts[-1])
        if total >= n_chars:
            break
    return texts


def print_cv_table(search):
    results = search.cv_results_
    print(f"\n{'candidate':<26}{'L0':>7}{'var. expl.':>12}{'loss rec.':>11}{'fit s':>8}")
    for index, params in enumerate(results["params"]):
        name = ", ".join(
            str(value) if key.endswith("architecture") else f"{key.split('__')[1]}={value}"
            for key, value in params.items()
        )
        marker = "  <- refit" if index == search.best_index_ else ""
        print(
            f"{name:<26}{-results['mean_test_neg_l0'][index]:>7.1f}"
            f"{results['mean_test_explained_variance'][index]:>12.3f}"
            f"{results['mean_test_loss_recovered'][index]:>11.3f}"
            f"{results['mean_fit_time'][index]:>8.1f}{marker}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Model selection from text: GridSearchCV over SAE sparsity on L0, "
        "variance and loss recovered."
    )
    parser.add_argument("--chars", type=int, default=24_000, help="characters of text to search on")
    parser.add_argument("--max-l0", type=float, default=40.0, help="L0 budget of the refit")
    parser.add_argument("--output", default="examples/output", help="folder for the plot and model")
    args = parser.parse_args(argv)
    try:
        model = corpora.smollm2_path()
    except ImportError as exc:
        sys.exit(f"{exc}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    texts = pick_texts(args.chars)
    pipeline = Pipeline(
        [
            ("acts", ActivationExtractor(model, layer=6, memory=tempfile.mkdtemp(prefix="sksae-"))),
            (
                "sae",
                SparseAutoencoder(
                    expansion_factor=4,
                    max_iter=10,
                    random_state=0,
                ),
            ),
        ]
    )
    grid = [
        {"sae__architecture": ["relu"], "sae__l1_coefficient": [1.0, 3.0]},
        {"sae__architecture": ["topk"], "sae__k": [16, 64]},
    ]
    search = GridSearchCV(
        pipeline,
        grid,
        cv=2,
        scoring=sae_scoring(loss_recovered=True),
        refit=pareto_refit(max_l0=args.max_l0, metric="loss_recovered"),
    )
    started = time.perf_counter()
    search.fit(texts)
    print(
        f"searched {len(search.cv_results_['params'])} candidates x 2 folds on {len(texts)} "
        f"texts in {time.perf_counter() - started:.0f} s"
    )
    print_cv_table(search)

    plot_frontier(search.cv_results_, metric="loss_recovered", path=output / "frontier.png")
    joblib.dump(search.best_estimator_, output / "pipeline.joblib")
    reloaded = joblib.load(output / "pipeline.joblib")
    new_texts = pick_texts(4000, offset=len(texts) + 5)
    codes = reloaded.transform(new_texts)
    same = np.array_equal(codes, search.best_estimator_.transform(new_texts))
    print(
        f"\nsaved {output / 'frontier.png'} and {output / 'pipeline.joblib'}; the reloaded "
        f"pipeline encodes {codes.shape[0]} new tokens at L0 {mean_l0(codes):.1f} "
        f"(identical to the original: {same})"
    )


if __name__ == "__main__":
    main()
