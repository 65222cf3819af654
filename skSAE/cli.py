"""The ``skSAE`` command line: extract, train, evaluate, dashboard, convert.

``skSAE extract`` streams a model's activations on texts into an HDF5 store (resumed
when rerun after an interruption), ``skSAE train`` fits a `SparseAutoencoder` on a store
(or straight on a model's activations) and saves it, ``skSAE evaluate`` prints its
metrics, ``skSAE dashboard`` writes its HTML page and ``skSAE convert`` rewrites it in
another format of `skSAE.io`. Without a subcommand (``python -m skSAE``), the main job
runs (`skSAE._main_job`); ``skSAE job`` names it.

Every subcommand takes ``--quiet`` (no progress bars or step messages; the result is
still printed), ``--json`` (the result as one JSON object on stdout; bars go to stderr)
and ``--debug`` (a traceback on failure). Exit status: 0 done; 1 failed, with a one-line
cause on stderr (a trained model that could not be saved to ``--output`` is saved
elsewhere, and the line says where); 2 a usage error (a bad flag, value or config key, or
an ``--output`` that cannot be written, found before any work); 130 interrupted, keeping
what was done (the store resumes, the model trained so far is saved, and with a
checkpoint the same command continues it).
"""

import argparse
import contextlib
import difflib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
import warnings
from pathlib import Path

import numpy as np

from . import (
    ActivationCache,
    ActivationExtractor,
    SparseAutoencoder,
    TrainingInterruptedWarning,
    corpora,
    io,
)
from ._main_job import add_arguments as add_main_job_arguments
from ._main_job import positive_int
from ._main_job import run as run_main_job

__all__ = ["COMMANDS", "UsageError", "build_parser", "main", "parameter_help", "parse_value"]

COMMANDS = ("job", "extract", "train", "evaluate", "dashboard", "convert")
"""The subcommands; ``job`` (the main job) is also what runs without one."""

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Estimator parameters with no command-line form: the bar follows --quiet, and a logger
# is an object (--tensorboard makes one).
_NOT_FLAGS = ("verbose", "logger")


class UsageError(Exception):
    """A bad flag, value or config key (exit status 2)."""


class InterruptedRun(Exception):  # noqa: N818 - a signal with its message, not an error
    """Ctrl-C, with what was kept (exit status 130)."""


def main(argv=None):
    """Run the command line; returns the exit status.

    Parameters
    ----------
    argv : list of str, default=None
        The arguments after the program name; None reads ``sys.argv``.

    Returns
    -------
    status : int
        0 done, 1 failed, 2 usage error, 130 interrupted.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["job", *argv]  # the main job, as `python -m skSAE` has always run it
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # named by the subcommand's parser, with its own usage line
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse: 0 after --help, 2 after a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" and the like
    prog = f"skSAE {args.command}"
    with _one_line_warnings(args) as caught:
        args.caught_warnings = caught
        try:
            with _result_stream(args) as out:
                result = args.handler(args)
            _print_result(args, result, out)
            return EXIT_OK
        except UsageError as exc:
            if args.debug:
                raise
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except InterruptedRun as exc:
            print(f"{prog}: interrupted: {exc}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:
            if args.debug:
                raise
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_FAILURE


# ------------------------------------------------------------------ the parser


def build_parser():
    """The `argparse.ArgumentParser` of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="skSAE",
        description="Sparse autoencoders on a language model's activations, from the shell.",
        epilog=(
            "Without a subcommand, the main job runs (`skSAE job --help`). Exit status: 0 done, "
            "1 failed (one line on stderr), 2 usage error, 130 interrupted."
        ),
    )
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument("--quiet", action="store_true", help="no progress bars or step messages")
    group.add_argument("--json", action="store_true", help="print the result as one JSON object")
    group.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)

    job = commands.add_parser("job", help="the main job: SmolLM2 -> SAE -> quality (the default)")
    add_main_job_arguments(job)
    job.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    job.set_defaults(handler=_job, quiet=False, json=False)

    extract = commands.add_parser(
        "extract", parents=[common], help="activations of a model on texts, into an HDF5 store"
    )
    extract.add_argument(
        "--store", required=True, help="the HDF5 file to write (resumed if unfinished)"
    )
    _add_texts_arguments(extract, default_split="train")
    _add_extractor_arguments(extract)
    extract.set_defaults(handler=_extract)

    train = commands.add_parser(
        "train",
        parents=[common],
        help="fit an SAE on a store (or on a model's activations) and save it",
        description=(
            "Fit a SparseAutoencoder and save it to --output. Every estimator parameter is a "
            "flag (--n-components 4096, --prefix-sizes 64,256, --target-l0 none) or a key of "
            "--config; flags win. Under torchrun, each rank trains its share and rank 0 saves."
        ),
    )
    source = train.add_argument_group("data (a store, or a model and texts)")
    source.add_argument("--store", help="an HDF5 store written by `skSAE extract`")
    train.add_argument("--output", required=True, help="folder to save the SAE to")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help=(
            "replace an existing --output (not needed to replace the model that an "
            "interrupted run of the same command, with its --checkpoint-path, saved)"
        ),
    )
    train.add_argument("--config", help="a TOML or JSON file of estimator parameters")
    train.add_argument("--tensorboard", metavar="DIR", help="log training metrics to DIR")
    _add_texts_arguments(train, default_split="train")
    _add_extractor_arguments(train, device=False)
    _add_estimator_arguments(train)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate", parents=[common], help="metrics of a saved SAE on held-out texts"
    )
    evaluate.add_argument("sae", help="a saved SAE folder (any format skSAE.io reads)")
    _add_texts_arguments(evaluate, default_split="held-out")
    _add_loaded_extractor_arguments(evaluate)
    evaluate.add_argument(
        "--labelled",
        choices=corpora.LABELLED_TASKS,
        help="also probe: labelled texts of this task (sparse probing, TPP)",
    )
    evaluate.add_argument(
        "--per-class", type=positive_int, default=40, help="labelled texts per class"
    )
    evaluate.add_argument("--absorption", action="store_true", help="first-letter absorption")
    evaluate.add_argument("--amortisation", action="store_true", help="encoder against OMP")
    evaluate.add_argument("--ablation", choices=("zero", "mean"), default="zero")
    evaluate.set_defaults(handler=_evaluate)

    dashboard = commands.add_parser(
        "dashboard", parents=[common], help="the HTML dashboard of a saved SAE's latents"
    )
    dashboard.add_argument("sae", help="a saved SAE folder (any format skSAE.io reads)")
    dashboard.add_argument("--output", required=True, help="the HTML file to write")
    _add_texts_arguments(dashboard, default_split="held-out")
    _add_loaded_extractor_arguments(dashboard)
    dashboard.add_argument("--n-latents", type=positive_int, default=20, help="latents to show")
    dashboard.add_argument("--latents", type=_int_list, help="these latents (e.g. 3,17,40)")
    dashboard.add_argument("--top", type=positive_int, default=10, help="top examples per latent")
    dashboard.add_argument("--title", help="page title")
    dashboard.add_argument(
        "--loss-recovered", action="store_true", help="measure loss recovered for the overview"
    )
    dashboard.set_defaults(handler=_dashboard)

    convert = commands.add_parser(
        "convert", parents=[common], help="rewrite a saved SAE in another format"
    )
    convert.add_argument("source", help="a saved SAE folder")
    convert.add_argument("target", help="the folder to write")
    convert.add_argument(
        "--from", dest="source_format", default="auto", help="the source's format (default: detect)"
    )
    convert.add_argument(
        "--to", dest="target_format", choices=("skSAE", "saelens"), default="skSAE"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing target")
    convert.add_argument(
        "--norm-scaling-factor", type=float, help="SAELens: the dataset's input scaling"
    )
    convert.set_defaults(handler=_convert)
    parser.commands = commands.choices
    return parser


def _add_texts_arguments(parser, default_split):
    group = parser.add_argument_group("texts")
    group.add_argument(
        "--texts",
        nargs="+",
        metavar="PATH",
        help="files (one text each; .jsonl: one per line's 'text') or folders of them",
    )
    group.add_argument(
        "--pattern", default="*.txt", help="files taken from a --texts folder (default *.txt)"
    )
    group.add_argument(
        "--corpus",
        choices=corpora.CORPORA,
        help="a built-in corpus (default: pydoc, Python's documentation, when no --texts)",
    )
    group.add_argument(
        "--split",
        choices=("train", "held-out", "all"),
        default=None,
        help=(
            f"which texts: the main job's training or held-out split, or all (default: "
            f"{default_split} for a corpus, all for --texts)"
        ),
    )
    parser.set_defaults(default_split=default_split)
    group.add_argument(
        "--tokens",
        type=positive_int,
        default=100_000,
        help="training split: about this many tokens",
    )
    group.add_argument(
        "--held-out-tokens",
        type=positive_int,
        default=4_000,
        help="held-out split: about this many tokens",
    )


def _add_extractor_arguments(parser, device=True):
    group = parser.add_argument_group("model and hook")
    group.add_argument(
        "--model", help="model folder, hub name or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    group.add_argument("--layer", type=int, default=6, help="block index, from 0 (default 6)")
    group.add_argument(
        "--hook", default="resid_post", help="resid_post, attn_out, mlp_out or a module path"
    )
    group.add_argument("--context-size", type=positive_int, default=128, help="tokens per context")
    group.add_argument(
        "--extract-batch-size", type=positive_int, default=8, help="contexts per forward pass"
    )
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    group.add_argument(
        "--max-norm-ratio",
        type=_optional_float,
        default=15.0,
        help="drop tokens over this many times the batch's median norm (none: keep all)",
    )
    group.add_argument("--keep-first-position", action="store_true", help="keep the attention sink")
    group.add_argument("--keep-special-tokens", action="store_true", help="keep BOS, EOS, padding")
    if device:
        group.add_argument("--device", default="auto", help="torch device (default: CUDA if any)")


def _add_loaded_extractor_arguments(parser):
    group = parser.add_argument_group("model and hook (default: the SAE's metadata)")
    group.add_argument("--model", help="the model (default: the SAE's recorded model_name)")
    group.add_argument("--layer", type=int, help="block index (default: the SAE's)")
    group.add_argument("--hook", help="hook (default: the SAE's)")
    group.add_argument(
        "--extract-batch-size", type=positive_int, default=8, help="contexts per forward pass"
    )
    group.add_argument("--device", default="auto", help="torch device (default: CUDA if any)")


def _add_estimator_arguments(parser):
    group = parser.add_argument_group(
        "estimator parameters (SparseAutoencoder; `none`, `true`, `false`, numbers and lists "
        "as 64,256 are read as such)"
    )
    helps = parameter_help(SparseAutoencoder)
    for name, default in SparseAutoencoder().get_params().items():
        if name in _NOT_FLAGS:
            continue
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"param_{name}",
            type=parse_value,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"{helps.get(name, '')} (default: {default!r})".replace("%", "%%"),
        )


def parameter_help(estimator_class):
    """The first sentence of each parameter's description in a numpydoc docstring.

    Parameters
    ----------
    estimator_class : type
        A class whose docstring has a ``Parameters`` section.

    Returns
    -------
    helps : dict of str to str
    """
    doc = estimator_class.__doc__ or ""
    section = doc.split("Parameters\n    ----------\n", 1)[-1].split("\n    Attributes\n", 1)[0]
    helps = {}
    for match in re.finditer(r"^    (\w+) : .*\n((?:        .*\n?)+)", section, flags=re.M):
        text = " ".join(line.strip() for line in match.group(2).splitlines()).replace("`", "")
        # The first sentence: a full stop before a capital, not after "et al" or "e.g".
        first = re.split(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z])", text, maxsplit=1)[0]
        helps[match.group(1)] = first.rstrip(".") + "."
    return helps


def parse_value(text):
    """A flag's value: JSON (numbers, ``true``, ``null``, lists), ``none``, ``a,b`` lists, or text.

    Examples
    --------
    >>> parse_value("32"), parse_value("1e-3"), parse_value("none"), parse_value("topk")
    (32, 0.001, None, 'topk')
    >>> parse_value("64,256"), parse_value("True")
    ([64, 256], True)
    """
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part.strip()]
    return text


def _optional_float(text):
    return None if text.strip().lower() == "none" else float(text)


def _int_list(text):
    """Latent indices: integers of at least 0, separated by commas (the SAE bounds them)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(
            f"expected latent indices (integers from 0) separated by commas, got {text!r}"
        )
    return values


# ------------------------------------------------------------------ the commands


def _job(args):
    run_main_job(args)


def _extract(args):
    texts = _texts(args)
    extractor = _extractor(args, args.device)
    store = Path(args.store)
    done_before = _texts_done(store)
    if done_before is None:
        status = "written"
    elif done_before == len(texts):
        status = "already complete"  # (if it holds these texts: `extract` checks)
    else:
        status = f"resumed at text {done_before}"
    started = time.perf_counter()
    _say(args, f"extracting {len(texts)} texts at {args.hook} of block {args.layer} into {store}")
    try:
        with _deferred_interrupt() as stop:
            cache = ActivationCache.write(_StoppableExtractor(extractor, stop), texts, store)
    except KeyboardInterrupt:
        done = _texts_done(store)
        if done is None:
            raise InterruptedRun(f"nothing was written to {store}") from None
        raise InterruptedRun(
            f"{store} holds {done} of {len(texts)} texts; run the same command again to resume"
        ) from None
    attrs = cache.attrs
    return {
        "store": str(store),
        "rows": int(cache.n_rows),
        "d_model": int(attrs["d_model"]) if "d_model" in attrs else None,
        "texts": len(texts),
        "status": status,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _train(args):
    params = _estimator_params(args)
    output = Path(args.output)
    # Before any work: a destination that saving would refuse loses nothing yet. A model
    # an interrupted run of this command saved is replaced by its rerun, as its hint says.
    overwrite = args.overwrite or _saved_by_interrupted_run(output, params.get("checkpoint_path"))
    _check_destination(output, overwrite, "--output")
    if args.tensorboard:
        from .logging import TensorBoardLogger

        params["logger"] = TensorBoardLogger(args.tensorboard)
    sae = SparseAutoencoder(**params)
    try:
        sae._validate_params()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    started = time.perf_counter()
    if args.store:
        if args.texts or args.corpus or args.model:
            raise UsageError(
                "give either --store or a model and texts (--model, --texts, --corpus)"
            )
        cache = _existing_store(args.store)
        metadata = cache.hook_metadata
        n_rows = cache.n_rows
        _say(args, f"training on {n_rows} rows of {cache.path}")
        with cache.open() as file:
            checkpoint_error = _fit_keeping_the_model(sae, file["activations"])
    else:
        texts = _texts(args)
        extractor = _extractor(args, params.get("device", "auto"))
        X = extractor.transform(texts)
        metadata = extractor.hook_metadata()
        n_rows = X.shape[0]
        _say(args, f"extracted {n_rows} rows; training")
        checkpoint_error = _fit_keeping_the_model(sae, X)
    seconds = time.perf_counter() - started
    interrupted = any(
        issubclass(caught.category, TrainingInterruptedWarning) for caught in args.caught_warnings
    )
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return None  # rank 0 saves and reports the model every rank trained
    if interrupted and sae.checkpoint_path is not None:
        # Marks the model as this run's, so that the rerun the hint below asks for may
        # replace it without --overwrite (`_saved_by_interrupted_run`).
        metadata = {
            **metadata,
            _INTERRUPTED_KEY: {"checkpoint_path": _absolute(sae.checkpoint_path)},
        }
    _save_keeping_the_model(sae, output, overwrite, metadata)
    if checkpoint_error is not None:
        raise RuntimeError(
            f"{_one_line(checkpoint_error)} The model trained so far ({sae.n_steps_} steps) "
            f"is saved to {output}."
        ) from checkpoint_error
    if interrupted:
        again = ""
        if sae.checkpoint_path is not None and Path(sae.checkpoint_path).exists():
            again = "; run the same command again to continue from its checkpoint"
        elif sae.checkpoint_path is not None:
            again = (
                f"; no checkpoint was written yet (every {sae.checkpoint_every} steps): the "
                "same command again starts over"
            )
        raise InterruptedRun(
            f"saved the model trained so far ({sae.n_steps_} steps) to {output}{again}"
        )
    return {
        "output": str(output),
        "rows": int(n_rows),
        "n_components": int(sae.components_.shape[0]),
        "architecture": sae.architecture,
        "passes": int(sae.n_iter_),
        "steps": int(sae.n_steps_),
        "batch_size": int(sae.batch_size_),
        "learning_rate": float(sae.learning_rate_),
        "dead_fraction": float(sae.dead_fraction_),
        "seconds": round(seconds, 2),
    }


def _evaluate(args):
    from .evaluation import evaluate

    sae, extractor, texts = _saved_sae_and_texts(args)
    labelled = None
    if args.labelled:
        labelled = corpora.labelled_texts(args.labelled, per_class=args.per_class)
    report = evaluate(
        sae,
        extractor,
        texts,
        labelled,
        absorption=args.absorption,
        amortisation=args.amortisation,
        ablation=args.ablation,
        verbose=not args.quiet,
    )
    return {"sae": args.sae, "texts": len(texts), **report}


def _dashboard(args):
    from .dashboard import write_dashboard

    sae, extractor, texts = _saved_sae_and_texts(args)
    n_components = sae.components_.shape[0]
    outside = [latent for latent in args.latents or () if latent >= n_components]
    if outside:
        raise UsageError(
            f"argument --latents: expected indices below {n_components} (the SAE's "
            f"n_components), got {outside}"
        )
    loss_recovered = None
    if args.loss_recovered:
        from .metrics import loss_recovered as measure

        loss_recovered = measure(sae, extractor, texts)
    path = write_dashboard(
        sae,
        extractor,
        texts,
        args.output,
        latents=args.latents,
        n_latents=args.n_latents,
        k=args.top,
        loss_recovered=loss_recovered,
        title=args.title,
        verbose=not args.quiet,
    )
    return {"output": str(path), "texts": len(texts), "loss_recovered": loss_recovered}


def _convert(args):
    _check_destination(Path(args.target), args.overwrite, "the target")
    kwargs = {}
    if args.norm_scaling_factor is not None:
        kwargs["norm_scaling_factor"] = args.norm_scaling_factor
    sae = _load_sae(args.source, args.source_format, **kwargs)
    path = io.save(sae, args.target, format=args.target_format, overwrite=args.overwrite)
    return {
        "source": args.source,
        "source_format": (
            io.detect_format(args.source) if args.source_format == "auto" else args.source_format
        ),
        "target": str(path or args.target),
        "target_format": args.target_format,
        "n_components": int(sae.components_.shape[0]),
    }


# ------------------------------------------------------------------ helpers


def _texts(args):
    """The texts the flags name, split as asked."""
    if args.texts and args.corpus:
        raise UsageError("give --texts or --corpus, not both")
    if args.texts:
        texts = corpora.read_texts(args.texts, pattern=args.pattern)
        split = args.split or "all"
    else:
        texts = corpora.named_texts(args.corpus or "pydoc")
        split = args.split or args.default_split
    if split != "all":
        train, held_out = corpora.split_texts(texts, args.tokens * 4, args.held_out_tokens * 4)
        texts = train if split == "train" else held_out
    if not texts:
        raise UsageError("no texts: the files hold no text")
    return texts


def _extractor(args, device):
    model = args.model or corpora.smollm2_path()
    return ActivationExtractor(
        model,
        hook=args.hook,
        layer=args.layer,
        context_size=args.context_size,
        batch_size=args.extract_batch_size,
        device=device,
        dtype=args.dtype,
        exclude_special_tokens=not args.keep_special_tokens,
        drop_first_position=not args.keep_first_position,
        max_norm_ratio=args.max_norm_ratio,
        verbose=not args.quiet,
    )


def _saved_sae_and_texts(args):
    """The saved SAE of ``args.sae``, its extractor and the texts (evaluate, dashboard)."""
    sae = _load_sae(args.sae)
    return sae, _loaded_extractor(args, sae), _texts(args)


def _loaded_extractor(args, sae):
    """The extractor of a loaded SAE's metadata, with the flags over it."""
    params = dict(batch_size=args.extract_batch_size, device=args.device, verbose=not args.quiet)
    metadata = getattr(sae, "metadata_", {})
    if args.hook is not None or args.layer is not None:
        metadata = {k: v for k, v in metadata.items() if k not in ("hook_name", "hf_hook_name")}
        metadata["hook"] = args.hook or metadata.get("hook") or "resid_post"
        metadata["layer"] = args.layer if args.layer is not None else metadata.get("layer", 6)
    model = args.model or metadata.get("model_name")
    if not model:
        raise UsageError(f"{args.sae} records no model; pass --model")
    return ActivationExtractor.from_metadata(metadata, model=model, **params)


def _load_sae(path, format="auto", **kwargs):
    if not Path(path).exists():
        raise FileNotFoundError(f"no SAE folder at {path}")
    return io.load(path, format, **kwargs)


def _existing_store(path):
    if not Path(path).exists():
        raise FileNotFoundError(
            f"no store at {path}; write one with `skSAE extract --store {path}`"
        )
    cache = ActivationCache(path)
    attrs = cache.attrs
    if not attrs.get("complete", False):
        raise ValueError(
            f"{path} is unfinished ({attrs.get('documents_done', 0)} of "
            f"{attrs.get('n_texts', '?')} texts); rerun its `skSAE extract` to finish it"
        )
    return cache


def _fit_stopping_on_interrupt(sae, X):
    """``sae.fit(X)``, where Ctrl-C stops at the next progress check (every 32 steps).

    The estimator keeps what it trained when interrupted; the check runs through its
    logger, so the interrupt is raised where the loop expects it.
    """
    inner = sae.logger
    with _deferred_interrupt() as stop:
        sae.set_params(logger=_StoppingLogger(stop, inner))
        try:
            sae.fit(X)
        finally:
            sae.set_params(logger=inner)


class _StoppingLogger:
    """Forwards to a logger (if any), then raises KeyboardInterrupt once Ctrl-C was pressed."""

    def __init__(self, stop, inner):
        self._stop = stop
        self._inner = inner

    def log(self, metrics, step):
        if self._inner is not None:
            self._inner.log(metrics, step)
        if self._stop.requested:
            raise KeyboardInterrupt

    def close(self):
        if hasattr(self._inner, "close"):
            self._inner.close()


class _StoppableExtractor:
    """An extractor whose batches stop (KeyboardInterrupt) after the one in hand on Ctrl-C."""

    def __init__(self, extractor, stop):
        self._extractor = extractor
        self._stop = stop

    def __getattr__(self, name):
        return getattr(self._extractor, name)

    def iter_batches(self, texts, first_document=0):
        return self._checked(self._extractor.iter_batches(texts, first_document))

    def _checked(self, batches):
        with contextlib.closing(batches):
            for batch in batches:
                yield batch  # the store writes and flushes it before asking for the next
                if self._stop.requested:
                    raise KeyboardInterrupt


@contextlib.contextmanager
def _deferred_interrupt():
    """Ctrl-C sets a flag that code checks at safe points; a second one raises at once.

    Python drops a KeyboardInterrupt raised while a weakref callback or ``__del__`` runs
    (torch runs many), so a first Ctrl-C raised at an arbitrary point can be lost.
    """
    stop = types.SimpleNamespace(requested=False)
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _texts_done(store):
    """How many texts an existing store holds (None when there is no store)."""
    if not store.exists():
        return None
    attrs = ActivationCache(store).attrs
    if attrs.get("complete", False):
        return int(attrs.get("n_texts", 0))
    return int(attrs.get("documents_done", 0))


def _estimator_params(args):
    """Estimator parameters: the config file's, then the flags' over them."""
    params = {}
    valid = set(SparseAutoencoder().get_params()) - set(_NOT_FLAGS)
    if args.config:
        params.update(_read_config(Path(args.config), valid))
    params.update(
        {
            name[len("param_") :]: value
            for name, value in vars(args).items()
            if name.startswith("param_")
        }
    )
    params.setdefault("verbose", 0 if args.quiet else 1)
    return params


def _read_config(path, valid):
    if not path.exists():
        raise UsageError(f"no config file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise UsageError(
            f"{path}, line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        if path.suffix == ".toml":
            import tomllib

            config = tomllib.loads(text)
        else:
            config = json.loads(text)
    except ValueError as exc:
        raise UsageError(
            f"{path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}"
        ) from exc
    if not isinstance(config, dict):
        raise UsageError(f"{path} must hold a table (object) of estimator parameters")
    for key in config:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"{path}: {key!r} is not a SparseAutoencoder parameter{hint}")
    return config


_INTERRUPTED_KEY = "interrupted_training"
"""The metadata key that marks a model saved by a ``train`` stopped with Ctrl-C while it
kept a checkpoint: ``{"checkpoint_path": the absolute path}``."""


def _absolute(path):
    return os.path.abspath(os.fspath(path))


def _check_destination(path, overwrite, flag):
    """Refuse now, before any work, a folder that saving would refuse (exit status 2)."""
    if path.is_file():
        raise UsageError(f"{flag} {path} is a file; it must name a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UsageError(
                f"{flag} {path} exists; pass --overwrite to replace it, or choose another folder"
            )
        try:
            io.detect_format(path)
        except io.FormatError:
            raise UsageError(
                f"{flag} {path} holds files that are not an SAE, and --overwrite replaces only "
                "an SAE folder; choose another folder"
            ) from None
    # Saving writes a new folder beside it (then renames it), creating missing parents:
    # the nearest folder that exists must take a new entry.
    parent = path.absolute().parent
    parent = next(folder for folder in (parent, *parent.parents) if folder.exists())
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".skSAE-write-test-", dir=parent))
    except OSError as exc:
        raise UsageError(
            f"{flag} {path}: cannot write in {parent} ({exc.strerror or exc}); choose another "
            "folder"
        ) from None


def _saved_by_interrupted_run(output, checkpoint_path):
    """Whether ``output`` holds the model a ``train`` with this checkpoint saved when stopped."""
    if checkpoint_path is None:
        return False
    try:
        config = json.loads((output / "config.json").read_text(encoding="utf-8"))
        marker = config["metadata"][_INTERRUPTED_KEY]
        return marker["checkpoint_path"] == _absolute(checkpoint_path)
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no skSAE folder, or not marked: --overwrite decides


def _fit_keeping_the_model(sae, X):
    """Fit, stopping on Ctrl-C; returns the error of a checkpoint that could not be written
    (a full disk) when the estimator kept the model trained so far, for `_train` to save
    it before it reports the error (None otherwise)."""
    try:
        _fit_stopping_on_interrupt(sae, X)
    except OSError as exc:
        if not getattr(exc, "kept_weights", False):
            raise
        return exc
    return None


def _save_keeping_the_model(sae, output, overwrite, metadata):
    """``io.save``; when it fails (a full disk...), the model is saved elsewhere, and the
    error says where, so that a finished training is never lost."""
    try:
        io.save(sae, output, overwrite=overwrite, **metadata)
    except Exception as exc:
        kept = _save_elsewhere(sae, output, metadata)
        if kept is None:
            where = "and it could not be saved anywhere else either (the disks are full?)"
        elif kept.suffix == ".joblib":
            where = f"the trained model is kept in {kept} instead (joblib.load reads it)"
        else:
            where = (
                f"the trained model is kept in {kept} instead (skSAE.io.load and `skSAE "
                "evaluate` read it; move it where you want it)"
            )
        raise RuntimeError(f"could not save to {output} ({_one_line(exc)}); {where}") from exc


def _save_elsewhere(sae, output, metadata):
    """Save to a new folder beside ``output``, else in the system's temporary folder (as an
    SAE folder, else a joblib file); returns the path, or None when nothing could be written."""
    import joblib

    for base in (output.absolute().parent, Path(tempfile.gettempdir())):
        try:
            folder = Path(tempfile.mkdtemp(prefix=f"{output.name}.unsaved-", dir=base))
        except OSError:
            continue
        try:
            io.save(sae, folder / "sae", **metadata)
            return folder / "sae"
        except Exception:
            pass  # the same fault as the first save: try the plain pickle
        try:
            joblib.dump(sae, folder / "sae.joblib")
            return folder / "sae.joblib"
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
    return None


def _say(args, message):
    if not args.quiet:
        print(message, flush=True)


@contextlib.contextmanager
def _result_stream(args):
    """With --json, everything but the result goes to stderr; yields the result's stream."""
    real_stdout = sys.stdout
    if args.json:
        with contextlib.redirect_stdout(sys.stderr):
            yield real_stdout
    else:
        yield real_stdout


@contextlib.contextmanager
def _one_line_warnings(args):
    """Warnings as one line each on stderr (``--debug``: Python's own form); records them."""
    caught = []
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        caught.append(warnings.WarningMessage(message, category, filename, lineno))
        if args.debug:
            original(message, category, filename, lineno, file, line)
        else:
            print(f"skSAE {args.command}: warning: {_one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():  # restores showwarning on the way out
        warnings.showwarning = show
        yield caught


def _one_line(exc):
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _print_result(args, result, out):
    if result is None:
        return
    if args.json:
        print(json.dumps(result, default=_json_default), file=out)
        return
    width = max(len(key) for key in result)
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        print(f"{key:<{width}}  {value}", file=out)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
