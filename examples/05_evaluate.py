"""Evaluate SAEs beyond L0: three architectures on SmolLM2-135M, one table, one figure.
====================================================================================

1. Extracts block-6 residual activations of SmolLM2-135M on Python's documentation.
2. Trains a TopK (k=32), a JumpReLU and a ReLU SAE (both ``target_l0=32``), so all
   three sit at a similar L0, at the library's defaults otherwise.
3. Evaluates each with `skSAE.evaluation.evaluate` on held-out documentation (the
   reconstruction diagnostics, loss recovered and KL) and on labelled Shakespeare
   passages (which play a passage comes from: sparse probing and TPP), and on the
   first-letter task (feature absorption, 3000 single-token words), and against
   OMP on its own dictionary at the same L0 (the amortisation gap, 2048 rows).
4. Prints the table and saves the figure (`plot_evaluation`).

Run from the repository root (offline; several minutes on 2 CPU cores)::

    python examples/05_evaluate.py
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from skSAE import ActivationExtractor, SparseAutoencoder, corpora
from skSAE.evaluation import evaluate, plot_evaluation

COLUMNS = [
    ("mean_l0", "L0", ".1f"),
    ("explained_variance", "var.expl", ".3f"),
    ("loss_recovered", "loss rec", ".3f"),
    ("kl_divergence", "KL", ".3f"),
    ("l2_ratio", "L2 ratio", ".3f"),
    ("relative_reconstruction_bias", "rel.bias", ".3f"),
    ("silent_fraction", "silent", ".3f"),
    ("dense_latents", "dense", "d"),
    ("decoder_max_cosine_mean", "dec.cos", ".3f"),
    ("probe_accuracy_top_1", "probe@1", ".3f"),
    ("probe_accuracy_top_5", "probe@5", ".3f"),
    ("probe_accuracy_all_latents", "probe all", ".3f"),
    ("probe_accuracy_model", "probe model", ".3f"),
    ("tpp", "TPP", ".3f"),
    ("mean_absorption_fraction_score", "absorb", ".3f"),
    ("mean_full_absorption_score", "full abs", ".3f"),
    ("mean_num_split_features", "splits", ".2f"),
    ("amortisation_gap", "OMP gain", "+.3f"),
    ("seconds", "eval s", ".0f"),
]


def pieces(texts, size):
    """Consecutive pieces of ``size`` characters of each text."""
    return [text[start : start + size] for text in texts for start in range(0, len(text), size)]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate SAEs beyond L0: three architectures on SmolLM2-135M, one "
        "table, one figure."
    )
    parser.add_argument("--train-chars", type=int, default=240_000)
    parser.add_argument("--held-out-chars", type=int, default=24_000)
    parser.add_argument("--per-class", type=int, default=30, help="labelled passages per play")
    parser.add_argument(
        "--absorption-words", type=int, default=3000, help="words of the first-letter task"
    )
    parser.add_argument("--output", default="examples/output/evaluation.png")
    args = parser.parse_args(argv)
    try:
        model = corpora.smollm2_path()
        labelled = corpora.labelled_texts("shakespeare_play", per_class=args.per_class, chars=500)
    except ImportError as exc:
        sys.exit(str(exc))
    started = time.perf_counter()
    docs = pieces(corpora.pydoc_texts(), 2000)
    n_train = args.train_chars // 2000
    train, held_out = docs[:n_train], docs[-(args.held_out_chars // 2000) :]
    # memory: the prompts of the absorption task are read once for the three SAEs
    # (`activations_at` caches them; the model's activations do not depend on the SAE).
    cache = tempfile.TemporaryDirectory(prefix="skSAE-example06-")
    extractor = ActivationExtractor(model, layer=6, verbose=1, memory=cache.name)
    X = extractor.transform(train)
    seconds = time.perf_counter() - started
    print(f"{X.shape[0]} training tokens of {len(train)} pieces ({seconds:.0f} s)")

    candidates = {
        "topk k=32": dict(architecture="topk", k=32),
        "jumprelu L0 32": dict(architecture="jumprelu", target_l0=32),
        "relu L0 32": dict(architecture="relu", target_l0=32),
    }
    reports = []
    for name, params in candidates.items():
        fit_started = time.perf_counter()
        sae = SparseAutoencoder(**params, max_iter=3, random_state=0, verbose=1).fit(X)
        fit_seconds = time.perf_counter() - fit_started
        report = evaluate(
            sae,
            extractor,
            held_out,
            labelled=labelled,
            absorption={"max_words": args.absorption_words},
            amortisation=True,
            verbose=1,
        )
        reports.append({"name": name, "fit_seconds": fit_seconds, **report})
        print(f"{name}: fitted in {fit_seconds:.0f} s, evaluated in {report['seconds']:.0f} s")

    print(f"\nheld out: {reports[0]['n_tokens']} tokens of documentation; probing: "
          f"{reports[0]['probe_texts']} Shakespeare passages, 4 plays")  # fmt: skip
    header = f"{'SAE':<16}" + "".join(f"{title:>12}" for _, title, _ in COLUMNS)
    print(header)
    print("-" * len(header))
    for report in reports:
        cells = "".join(f"{format(report[key], spec):>12}" for key, _, spec in COLUMNS)
        print(f"{report['name']:<16}{cells}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).with_suffix(".json").write_text(json.dumps(reports, indent=1, default=float))
    plot_evaluation(reports, path=args.output)
    print(f"\nfigure: {args.output} (reports: .json); {time.perf_counter() - started:.0f} s in all")
    cache.cleanup()


if __name__ == "__main__":
    main()
