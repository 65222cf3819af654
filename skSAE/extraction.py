"""`ActivationExtractor`: text in, activations of a transformers model out (and back in).

transformers is imported lazily, when a model is first loaded. The row schema
(`Extraction`) and the HDF5 store belong to `skSAE.cache`, the module below this one;
the settings that change the rows (`ActivationExtractor.extraction_key`) belong here.

Shape suffixes::

    N rows of X (tokens, flattened)   B minibatch rows (contexts)   S sequence positions
    D n_features (d_model)            V vocabulary
"""

import bisect
import functools
import hashlib
import os
import sys
import time
import warnings
from contextlib import contextmanager
from numbers import Integral, Real
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_memory
from tqdm.auto import tqdm

from ._hook_names import ATTENTION_NAMES, MLP_NAMES, extractor_hook, transformer_lens_name
from ._sklearn_compat import HasMethods, Interval, StrOptions, _fit_context, validate_params
from ._utils import resolve_device
from ._version import __version__, pop_saved_version
from .cache import ActivationCache, Extraction

HOOKS = ("resid_post", "attn_out", "mlp_out")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Documents and characters tokenised per call to the tokenizer (memory grows with both:
# one 2 MB text in one call peaked at 1.3 GB); a longer text goes in windows of this size.
_DOCUMENTS_PER_GROUP = 256
_TOKENIZER_CHARS = 2**16


__all__ = ["ActivationExtractor", "BaselineLosses", "ExtractedBatch", "Extraction", "SplicedLosses"]


class ExtractedBatch(NamedTuple):
    """The rows of one forward batch of `ActivationExtractor.iter_batches`.

    The first four fields are those of `skSAE.cache.Extraction` (the row schema), for
    the rows of this batch only.
    """

    activations: np.ndarray
    """Float32 array of shape (n_rows, d_model); ``n_rows`` may be 0."""
    token_ids: np.ndarray
    """Int64 array of shape (n_rows,): the token at each row."""
    doc_index: np.ndarray
    """Int64 array of shape (n_rows,): index in ``texts`` of the text each row came from."""
    position: np.ndarray
    """Int64 array of shape (n_rows,): index of the token within its text's tokens."""
    documents_done: int
    """Number of leading texts whose rows have all been yielded, this batch included
    (``len(texts)`` after the last batch): a resume can start at this text."""


class SplicedLosses(NamedTuple):
    """Next-token cross-entropies of a clean run and of spliced runs on the same tokens."""

    clean: float
    """Mean cross-entropy (nats per predicted token) of the unmodified model."""
    spliced: dict
    """Name of each replacement to its mean cross-entropy."""
    kl: dict
    """Name of each replacement to the mean KL divergence KL(clean || spliced) per token."""


class BaselineLosses(NamedTuple):
    """Cross-entropies of the clean model and of the ablated hook (`loss_recovered`'s baselines)."""

    clean: float
    """Mean cross-entropy (nats per predicted token) of the unmodified model."""
    ablated: float
    """Mean cross-entropy with the ablation spliced in at the positions `extract` keeps."""


class _Batch(NamedTuple):
    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    keep_BS: torch.Tensor
    doc_BS: torch.Tensor
    position_BS: torch.Tensor
    documents_done: int


class _StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a capture hook to skip the layers after the hooked one."""


class _TextProgress(tqdm):
    """A progress bar over the characters of a list of texts, advanced by texts done."""

    def __init__(self, texts, first_document, **kwargs):
        self._ends = np.cumsum([0, *(len(text) for text in texts)])
        super().__init__(
            total=int(self._ends[-1]),
            initial=int(self._ends[first_document]),
            unit="char",
            unit_scale=True,
            **kwargs,
        )

    def advance(self, documents_done):
        """Move to the end of text ``documents_done - 1``."""
        self.update(int(self._ends[documents_done]) - self.n)


class ActivationExtractor(TransformerMixin, BaseEstimator):
    """Activations of a transformers model at one hook point, one row per kept token.

    Parameters
    ----------
    model : str, path or transformers.PreTrainedModel, default=None
        A folder or hub name that `transformers` loads (offline when the hub is
        unreachable), a ``.gguf`` file, or an already loaded model. A ``.gguf`` file is
        converted once to a safetensors folder under `cache_dir` and reloaded from there.
    tokenizer : str, path or transformers tokenizer, default=None
        A folder or hub name, or a loaded tokenizer; defaults to the model's own.
    hook : str, default="resid_post"
        ``"resid_post"`` (output of block `layer`, the residual stream), ``"attn_out"``
        or ``"mlp_out"`` (outputs of that block's attention or MLP), or the dotted path of
        any module (e.g. ``"model.layers.3.mlp"``), in which case `layer` is ignored.
    layer : int, default=6
        Index of the block, from 0.
    context_size : int, default=128
        Tokens per context, special tokens included. Longer texts are cut into
        consecutive contexts.
    batch_size : int, default=8
        Contexts per forward pass.
    device : str, default="auto"
        Torch device of the model: ``"auto"`` picks CUDA when available.
    dtype : {"float32", "bfloat16", "float16"}, default="float32"
        Dtype the model runs in; activations are returned as float32.
    exclude_special_tokens : bool, default=True
        Drop rows of special tokens (BOS, EOS, CLS, SEP) and padding.
    drop_first_position : bool, default=True
        Drop the first position of every context. Causal models park attention there
        (an "attention sink"): on SmolLM2-135M-Instruct (`skSAE.corpora.smollm2_path`)
        its residual norm is 7x the median at block 6 and ~140x at block 15, which
        would dominate an SAE's loss. Past block 6 a few other tokens are as extreme
        (see `max_norm_ratio`).
    max_norm_ratio : float or None, default=15.0
        Drop the tokens whose activation norm at the hook is more than this many times
        the median norm of the tokens the other rules keep in the same forward batch
        (`batch_size` contexts): a few tokens carry "massive activations" (Sun et al.
        2024) that would dominate an SAE's loss. None keeps every token. The rule is
        streamed, one forward batch at a time, so the rows depend on `batch_size`
        (which is part of `extraction_key`) wherever a token sits near the limit.
        On SmolLM2-135M-Instruct (46,721 rows of Python's documentation, the main
        job's texts), 15 drops no row at block 6 (the largest is 10x its batch's
        median), 4 rows at block 12 (18x to 175x; the kept rows stay under 3.2x),
        3 at block 15 (53x to 145x; one kept row at 14.5x) and 3 at block 20 (39x to
        106x; the kept rows stay under 10.5x). The 2-3 training rows dropped held 45%,
        35% and 23% of the squared norm at blocks 12, 15 and 20, and with them the
        held-out variance explained of a TopK SAE (``python -m skSAE --layer 12`` as it
        was then, 40k training tokens; on the kept rows) rises from 0.39 to 0.78 at
        block 12 and from 0.43 to 0.73 at block 20.
    cache_dir : str, default=None
        Where converted ``.gguf`` models are kept; defaults to ``$SKSAE_CACHE`` or
        ``~/.cache/skSAE``.
    memory : str, path or joblib.Memory, default=None
        Cache in-memory extractions and the baseline cross-entropies
        (`baseline_cross_entropies`, used by `skSAE.metrics.loss_recovered`) on disk,
        keyed by the texts and `extraction_key`. In a model selection over a text
        pipeline, each candidate then reuses the activations of the first instead of
        recomputing them. Needs `model` given as a path or name.
    verbose : int or bool, default=0
        Progress bar (stdout) with tokens per second.

    Attributes
    ----------
    model_ : transformers.PreTrainedModel
        The loaded model (after the first extraction). Not pickled when `model` is a path.
    tokenizer_ : transformers tokenizer
        The loaded tokenizer.
    tokens_per_second_ : float
        Kept tokens per second of the last extraction.

    Notes
    -----
    Output rows are tokens, not texts: ``transform`` changes the number of rows, on
    purpose (it is the point of the transformer). ``y`` must be None.

    The forward pass stops right after the hooked module, so later layers (and the
    unembedding) cost nothing during extraction.

    Splicing (`cross_entropy`, `spliced_losses`, `skSAE.metrics.loss_recovered`) replaces
    the activation at exactly the positions that `extract` returns rows for; the others
    (the first position, special tokens, tokens over `max_norm_ratio`) keep their clean
    values, so an SAE is only ever asked to reconstruct what it was trained on, and
    baselines use the same positions. The norm rule is applied to the clean activation
    at the hook in the spliced forward pass itself, which is the activation `extract`
    returns for the same texts (the same batches of contexts).

    Texts go to the tokenizer in bounded pieces, as they go to the model in contexts:
    at most 65,536 characters per call, so memory stays bounded whatever a text's
    length (one 2 MB text tokenised whole took 1.3 GB). A longer text is tokenised in
    overlapping windows joined where both windows start the same token, which gives
    the tokens of the whole text (a stretch of 8,192 characters with no such common
    start, one unbroken "word", is the exception); a shorter one is tokenised whole.

    A store resumed by `extract` with ``store=`` restarts its batches at a text, so
    with `max_norm_ratio` set, a token near the limit may fall on the other side of it
    than in an uninterrupted extraction. The same holds for any extraction of a subset
    or another order of the texts.

    References
    ----------
    Sun, M., Chen, X., Kolter, J. Z. and Liu, Z. (2024). Massive activations in large
    language models. COLM 2024, arXiv:2402.17762.

    Examples
    --------
    >>> from skSAE import ActivationExtractor
    >>> extractor = ActivationExtractor("path/to/model", layer=3)
    >>> extractor.get_params()["hook"]
    'resid_post'
    """

    _parameter_constraints: dict = {
        "model": [str, os.PathLike, torch.nn.Module, None],
        "tokenizer": [str, os.PathLike, HasMethods(["__call__", "decode"]), None],
        "hook": [str],
        "layer": [Interval(Integral, 0, None, closed="left")],
        "context_size": [Interval(Integral, 2, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str],
        "dtype": [StrOptions(set(_DTYPES))],
        "exclude_special_tokens": ["boolean"],
        "drop_first_position": ["boolean"],
        "max_norm_ratio": [Interval(Real, 1, None, closed="left"), None],
        "cache_dir": [str, os.PathLike, None],
        "memory": [None, str, os.PathLike, HasMethods(["cache"])],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        model=None,
        *,
        tokenizer=None,
        hook="resid_post",
        layer=6,
        context_size=128,
        batch_size=8,
        device="auto",
        dtype="float32",
        exclude_special_tokens=True,
        drop_first_position=True,
        max_norm_ratio=15.0,
        cache_dir=None,
        memory=None,
        verbose=0,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.hook = hook
        self.layer = layer
        self.context_size = context_size
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.exclude_special_tokens = exclude_special_tokens
        self.drop_first_position = drop_first_position
        self.max_norm_ratio = max_norm_ratio
        self.cache_dir = cache_dir
        self.memory = memory
        self.verbose = verbose

    def __sklearn_clone__(self):
        # Share a loaded model instead of deep-copying its weights.
        return type(self)(**self.get_params(deep=False))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = False
        tags.transformer_tags.preserves_dtype = []
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Check the parameters; the model is loaded lazily, at the first extraction.

        Parameters
        ----------
        X : list of str, default=None
            Ignored.
        y : None
            Ignored.

        Returns
        -------
        self : ActivationExtractor
        """
        _check_y(y)
        return self

    def transform(self, X):
        """Activations of every kept token of every text.

        Parameters
        ----------
        X : list of str
            Texts.

        Returns
        -------
        activations : ndarray of shape (n_tokens, d_model)
            Float32 activations at the hook, rows in text order.
        """
        return self.extract(X).activations

    def fit_transform(self, X, y=None):
        """Same as `transform` (there is nothing to fit)."""
        return self.fit(X, y).transform(X)

    # -------------------------------------------------------------- extraction

    def extract(self, texts, store=None):
        """Activations with their token ids and (text, position) of origin.

        Parameters
        ----------
        texts : list of str
            Texts.
        store : str or path, default=None
            An HDF5 file to stream the rows into instead of returning them. An
            unfinished file of the same extraction (same `extraction_key` and texts) is
            resumed where it stopped; see `skSAE.cache.ActivationCache.write`.

        Returns
        -------
        extraction : Extraction or skSAE.cache.ActivationCache
            In-memory arrays, or the store (when `store` is given).

        Raises
        ------
        ValueError
            If a text is not valid Unicode (a lone surrogate), or no token is kept (the
            texts are too short once special tokens and the first position of each
            context are dropped); with `store`, nothing is then written.
        OSError
            With `store`, if the file system refuses a write (a full disk): the store
            keeps the rows written so far, unfinished, and the same call continues it.
        """
        texts = _check_texts(texts)
        if store is not None:
            return ActivationCache.write(self, texts, store)
        memory = self._memory()
        if memory is not None:
            return memory.cache(_extract_in_memory, ignore=["extractor"])(
                self, self.extraction_key(), texts
            )
        return _extract_in_memory(self, None, texts)

    def activations_at(self, texts, positions):
        """The activation at one token position of each text, in bounded memory.

        For probes that read one token per prompt (the word of a first-letter prompt,
        the last token of a question): one streaming pass keeps one row per text. With
        `memory` set, the rows are cached on disk like `extract`'s.

        Parameters
        ----------
        texts : list of str
            Texts.
        positions : array-like of int of shape (n_texts,)
            For each text, the index of the token to read within its tokens (as
            `extract`'s ``position``).

        Returns
        -------
        activations : ndarray of shape (n_found, d_model)
            Float32 rows, in text order, of the texts whose token was kept.
        found : ndarray of bool of shape (n_texts,)
            Whether each text's token was kept (`extract` drops special tokens, the
            first position of each context and outlier norms).
        """
        texts = _check_texts(texts)
        positions = np.asarray(positions, dtype=np.int64)
        if positions.shape != (len(texts),):
            raise ValueError(
                f"positions must hold one index per text ({len(texts)}), got shape "
                f"{positions.shape}."
            )
        memory = self._memory()
        if memory is not None:
            return memory.cache(_activations_at, ignore=["extractor"])(
                self, self.extraction_key(), texts, positions
            )
        return _activations_at(self, None, texts, positions)

    def _memory(self):
        """The joblib Memory, or None; rejects a model object (it has no stable key)."""
        if self.memory is None:
            return None
        if _is_model_object(self.model):
            raise ValueError(
                "memory needs model given as a path or name, not a loaded model: a loaded "
                "model has no stable cache key."
            )
        memory = self.memory
        return check_memory(os.fspath(memory) if isinstance(memory, os.PathLike) else memory)

    def extraction_key(self):
        """The settings that change the rows, as a dict of str, int, float and bool.

        The cache of `memory` is keyed by it (with the texts), and an HDF5 store
        (`extract` with ``store=``) records it in its attributes and refuses to resume
        under another key.

        Returns
        -------
        key : dict
            ``model`` and ``tokenizer`` (their identities), ``hook``, ``layer``,
            ``context_size``, ``batch_size`` (the norm rule's median is taken per
            forward batch), ``dtype``, ``exclude_special_tokens``,
            ``drop_first_position``, ``max_norm_ratio`` (a float: ``inf`` for None, as
            HDF5 attributes hold no None) and ``sksae_version``. A local file or folder is
            identified by its name and the SHA-256 of its content (so the key survives
            a move, e.g. into a new virtual environment, and changes with the weights),
            a hub name by itself, a loaded model by its name (``name_or_path``, else its
            class) and the SHA-256 of its weights in `dtype` (never by its name alone,
            so two models of one class have two keys; it costs one pass over the
            weights, about 1.2 s for SmolLM2-135M), and a loaded tokenizer by the
            SHA-256 of its vocabulary and rules. ``tokenizer`` is ``"the model's"`` when
            it is None.
        """
        self._validate_params()  # the parameters are read here without load()
        tokenizer = self.tokenizer
        ratio = self.max_norm_ratio
        return {
            "model": _model_identity(self.model, self.dtype),
            "tokenizer": "the model's" if tokenizer is None else _tokenizer_identity(tokenizer),
            "hook": self.hook,
            "layer": int(self.layer),
            "context_size": int(self.context_size),
            "batch_size": int(self.batch_size),
            "dtype": self.dtype,
            "exclude_special_tokens": bool(self.exclude_special_tokens),
            "drop_first_position": bool(self.drop_first_position),
            "max_norm_ratio": float("inf") if ratio is None else float(ratio),
            "sksae_version": __version__,
        }

    def _extract_now(self, texts):
        parts = list(self.iter_batches(texts))
        if sum(part.activations.shape[0] for part in parts) == 0:
            raise ValueError(
                "No token was kept: the texts are too short once special tokens and "
                "the first position of each context are dropped."
            )
        columns = Extraction._fields
        return Extraction(
            *(np.concatenate([getattr(part, name) for part in parts]) for name in columns)
        )

    def iter_batches(self, texts, first_document=0):
        """The rows of `extract`, one forward batch at a time (bounded memory).

        The model is loaded, the hook resolved and the texts checked when this method
        is called, before the first batch is computed.

        Parameters
        ----------
        texts : list of str
            Texts.
        first_document : int, default=0
            Start at this text (to resume an interrupted extraction): the rows of
            earlier texts are not computed.

        Returns
        -------
        batches : iterator of ExtractedBatch
            The rows of each batch of contexts, in text order. A batch may hold no row
            (its tokens were all dropped); ``documents_done`` still advances.
        """
        texts = _check_texts(texts)
        if not (isinstance(first_document, Integral) and 0 <= first_document <= len(texts)):
            raise ValueError(
                f"first_document must be an int in 0..{len(texts)} (the number of texts), "
                f"got {first_document!r}."
            )
        model, _ = self.load()
        module = self._hook_module()
        batches = self._batches(texts, next(model.parameters()).device, int(first_document))
        return self._generate_batches(model, module, batches, texts, int(first_document))

    def _progress(self, desc, texts, first_document=0):
        """A bar over the texts' characters (known up front: a total and a true ETA).

        Texts differ in length, so the bar counts characters, not texts; call
        `_TextProgress.advance` with a batch's ``documents_done``.
        """
        return _TextProgress(
            texts, first_document, desc=desc, disable=not self.verbose, file=sys.stdout
        )

    def _generate_batches(self, model, module, batches, texts, first_document):
        captured = []

        def capture(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        n_kept = 0
        started = time.perf_counter()
        progress = self._progress("extracting", texts, first_document)
        handle = module.register_forward_hook(capture)
        try:
            with torch.inference_mode():
                for batch in batches:
                    captured.clear()
                    try:
                        model(input_ids=batch.input_ids_BS, attention_mask=batch.attention_mask_BS)
                    except _StopForward:
                        pass
                    if not captured:
                        raise RuntimeError(
                            f"hook {self.hook!r} did not run during the forward pass."
                        )
                    keep_BS = self._kept(batch.keep_BS, captured[0])
                    acts_ND = captured[0][keep_BS].to("cpu", torch.float32).numpy()
                    n_kept += acts_ND.shape[0]
                    progress.advance(batch.documents_done)
                    elapsed = time.perf_counter() - started
                    progress.set_postfix_str(
                        f"{n_kept} tok, {n_kept / max(elapsed, 1e-9):.0f} tok/s", refresh=False
                    )
                    yield ExtractedBatch(
                        activations=acts_ND,
                        token_ids=batch.input_ids_BS[keep_BS].cpu().numpy(),
                        doc_index=batch.doc_BS[keep_BS].cpu().numpy(),
                        position=batch.position_BS[keep_BS].cpu().numpy(),
                        documents_done=batch.documents_done,
                    )
        finally:
            handle.remove()
            progress.close()
            elapsed = time.perf_counter() - started
            self.tokens_per_second_ = n_kept / elapsed if elapsed > 0 else float("nan")

    def _kept(self, keep_BS, hidden_BSD):
        """``keep_BS`` less the tokens over `max_norm_ratio` times the batch's median norm.

        ``hidden_BSD`` is the clean activation at the hook. `extract` and the splices
        both call this, so they keep and replace the same positions.
        """
        if self.max_norm_ratio is None or not bool(keep_BS.any()):
            return keep_BS
        norm_BS = torch.linalg.vector_norm(hidden_BSD.float(), dim=-1)
        # Massive activations (Sun et al. 2024): on SmolLM2, a few tokens at 18-175x.
        median = norm_BS[keep_BS].median()  # the lower middle value for an even count
        return keep_BS & (norm_BS <= self.max_norm_ratio * median)

    # ------------------------------------------------------------------ splice

    @contextmanager
    def splice(self, replacement, positions=None):
        """Run the model with the hooked activation replaced by ``replacement(activation)``.

        Parameters
        ----------
        replacement : callable
            Maps the hooked activation, a tensor of shape (batch, seq, d_model), to a
            tensor of the same shape: an SAE's reconstruction, zeros, the mean, or the
            activation plus a scaled decoder direction (steering).
        positions : callable, default=None
            Returns a boolean mask of shape (batch, seq) of the positions to replace;
            the rest keep their clean values. ``None`` replaces every position.

        Yields
        ------
        model : transformers.PreTrainedModel
            The loaded model, spliced until the block exits.
        """
        mask = None if positions is None else (lambda hidden_BSD: positions())
        with self._splice(replacement, mask) as model:
            yield model

    @contextmanager
    def _splice(self, replacement, positions):
        """`splice`, with ``positions`` given the clean hooked activation (or None)."""
        model, _ = self.load()
        module = self._hook_module()

        def replace(module, args, output):
            hidden_BSD = output[0] if isinstance(output, tuple) else output
            new_BSD = replacement(hidden_BSD).to(hidden_BSD.dtype)
            if new_BSD.shape != hidden_BSD.shape:
                raise ValueError(
                    f"replacement returned shape {tuple(new_BSD.shape)}, expected "
                    f"{tuple(hidden_BSD.shape)}."
                )
            if positions is not None:
                new_BSD = torch.where(positions(hidden_BSD)[..., None], new_BSD, hidden_BSD)
            return (new_BSD, *output[1:]) if isinstance(output, tuple) else new_BSD

        handle = module.register_forward_hook(replace)
        try:
            yield model
        finally:
            handle.remove()

    def spliced_losses(self, texts, replacements):
        """Cross-entropy of the clean model and of each splice, on the same tokens.

        Parameters
        ----------
        texts : list of str
            Texts; each is cut into contexts as in `extract`.
        replacements : dict of str to callable
            Each maps the hooked activation to its replacement (see `splice`); it is
            applied at the positions `extract` keeps (the norm rule of `max_norm_ratio`
            reads the clean activation at the hook in each spliced forward pass).

        Returns
        -------
        losses : SplicedLosses
            Mean next-token cross-entropy over every non-padding prediction, and the
            mean KL divergence of each spliced model from the clean one.
        """
        texts = _check_texts(texts)
        model = self._language_model()
        device = next(model.parameters()).device
        current = {}

        def kept(hidden_BSD):
            return self._kept(current["keep_BS"], hidden_BSD)

        sums = {name: 0.0 for name in replacements}
        kl_sums = {name: 0.0 for name in replacements}
        clean_sum = 0.0
        n_predictions = 0
        progress = self._progress("loss recovered", texts)
        with torch.inference_mode(), progress:
            for batch in self._batches(texts, device):
                progress.advance(batch.documents_done)
                current["keep_BS"] = batch.keep_BS
                labels_BS = _labels(batch)
                clean_BSV = self._logits(model, batch)
                clean_sum += _cross_entropy_sum(clean_BSV, labels_BS)
                n_predictions += int((labels_BS[:, 1:] != -100).sum())
                for name, replacement in replacements.items():
                    with self._splice(replacement, kept):
                        spliced_BSV = self._logits(model, batch)
                    sums[name] += _cross_entropy_sum(spliced_BSV, labels_BS)
                    kl_sums[name] += _kl_sum(clean_BSV, spliced_BSV, labels_BS)
        _check_predictions(n_predictions)
        return SplicedLosses(
            clean=clean_sum / n_predictions,
            spliced={name: total / n_predictions for name, total in sums.items()},
            kl={name: total / n_predictions for name, total in kl_sums.items()},
        )

    def cross_entropy(self, texts, replacement=None):
        """Mean next-token cross-entropy on ``texts``, optionally spliced.

        One forward pass per batch of contexts: the clean one, or the spliced one.

        Parameters
        ----------
        texts : list of str
            Texts.
        replacement : callable, default=None
            See `splice`; applied at the positions `extract` keeps.

        Returns
        -------
        cross_entropy : float
            Nats per predicted token.
        """
        texts = _check_texts(texts)
        model = self._language_model()
        device = next(model.parameters()).device
        current = {}

        def kept(hidden_BSD):
            return self._kept(current["keep_BS"], hidden_BSD)

        total = 0.0
        n_predictions = 0
        with torch.inference_mode():
            for batch in self._batches(texts, device):
                labels_BS = _labels(batch)
                if replacement is None:
                    logits_BSV = self._logits(model, batch)
                else:
                    current["keep_BS"] = batch.keep_BS
                    with self._splice(replacement, kept):
                        logits_BSV = self._logits(model, batch)
                total += _cross_entropy_sum(logits_BSV, labels_BS)
                n_predictions += int((labels_BS[:, 1:] != -100).sum())
        _check_predictions(n_predictions)
        return total / n_predictions

    @validate_params(
        {"texts": ["array-like"], "ablation": [StrOptions({"zero", "mean"})]},
        prefer_skip_nested_validation=True,
    )
    def ablation_replacement(self, texts, ablation="zero"):
        """The replacement function of an ablation baseline, for `splice`.

        Parameters
        ----------
        texts : list of str
            Texts whose kept tokens give the mean activation (``ablation="mean"``).
        ablation : {"zero", "mean"}, default="zero"
            Replace the hooked activation by zeros, or by its mean over the kept tokens
            of ``texts``.

        Returns
        -------
        replacement : callable
            Maps a hooked activation tensor to its ablation, of the same shape.
        """
        if ablation == "zero":
            return torch.zeros_like
        return _MeanReplacement(self.extract(texts).activations.mean(axis=0))

    @validate_params(
        {"texts": ["array-like"], "ablation": [StrOptions({"zero", "mean"})]},
        prefer_skip_nested_validation=True,
    )
    def baseline_cross_entropies(self, texts, ablation="zero"):
        """Cross-entropies of the clean model and of the ablated hook, on ``texts``.

        The baselines of `skSAE.metrics.loss_recovered`. With `memory` set they are
        cached, keyed by the texts, the ablation and `extraction_key`, so scoring many
        SAEs on the same texts computes them once.

        Parameters
        ----------
        texts : list of str
            Texts.
        ablation : {"zero", "mean"}, default="zero"
            See `ablation_replacement`.

        Returns
        -------
        losses : BaselineLosses
            Nats per predicted token; the ablation replaces the positions `extract`
            keeps.
        """
        texts = _check_texts(texts)
        memory = self._memory()
        if memory is None:
            return _baseline_cross_entropies(self, None, texts, ablation)
        cached = memory.cache(_baseline_cross_entropies, ignore=["extractor"])
        return cached(self, self.extraction_key(), texts, ablation)

    def _language_model(self):
        """The loaded model, checked to have a language-model head."""
        model, _ = self.load()
        if model.get_output_embeddings() is None:
            raise ValueError(
                f"{type(model).__name__} has no language-model head, so cross-entropy "
                "is undefined; load the model with a causal LM head."
            )
        return model

    @staticmethod
    def _logits(model, batch):
        output = model(input_ids=batch.input_ids_BS, attention_mask=batch.attention_mask_BS)
        return output.logits.float()

    # ------------------------------------------------------------ tokenisation

    def _batches(self, texts, device, first_document=0):
        """Contexts of ``context_size`` tokens, padded into batches of ``batch_size``."""
        _, tokenizer = self.load()
        prefix, suffix = _special_template(tokenizer)
        content = self.context_size - len(prefix) - len(suffix)
        if content < 1:
            raise ValueError(
                f"context_size={self.context_size} leaves no room for text next to the "
                f"{len(prefix) + len(suffix)} special tokens the tokenizer adds."
            )
        special_ids = set(tokenizer.all_special_ids)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        pending = []
        for group_start, group in _text_groups(texts, first_document):
            if len(group[0]) > _TOKENIZER_CHARS:  # a long text, alone in its group
                encoded = [_long_text_ids(tokenizer, group[0])]
            else:
                encoded = tokenizer(group, add_special_tokens=False)["input_ids"]
            for offset, ids in enumerate(encoded):
                doc = group_start + offset
                for start in range(0, len(ids), content):
                    if len(pending) == self.batch_size:
                        # Contexts come in text order: every text before `doc` is done.
                        yield self._collate(pending, special_ids, pad_id, device, doc)
                        pending = []
                    piece = ids[start : start + content]
                    pending.append((doc, start, prefix + piece + suffix, len(prefix), len(suffix)))
        if pending:
            yield self._collate(pending, special_ids, pad_id, device, len(texts))

    def _collate(self, contexts, special_ids, pad_id, device, documents_done):
        """Pad contexts into one batch with its keep mask and row provenance."""
        width = max(len(ids) for _, _, ids, _, _ in contexts)
        shape = (len(contexts), width)
        input_ids = np.full(shape, pad_id, dtype=np.int64)
        attention = np.zeros(shape, dtype=np.int64)
        keep = np.zeros(shape, dtype=bool)
        doc = np.full(shape, -1, dtype=np.int64)
        position = np.full(shape, -1, dtype=np.int64)
        for row, (doc_index, start, ids, n_prefix, n_suffix) in enumerate(contexts):
            length = len(ids)
            input_ids[row, :length] = ids
            attention[row, :length] = 1
            doc[row, :length] = doc_index
            position[row, n_prefix : length - n_suffix] = start + np.arange(
                length - n_prefix - n_suffix
            )
            kept = np.ones(length, dtype=bool)
            if self.exclude_special_tokens:
                kept[:n_prefix] = False
                kept[length - n_suffix :] = False
                kept &= ~np.isin(ids, list(special_ids))
            if self.drop_first_position:
                kept[0] = False
            keep[row, :length] = kept
        return _Batch(
            torch.from_numpy(input_ids).to(device),
            torch.from_numpy(attention).to(device),
            torch.from_numpy(keep).to(device),
            torch.from_numpy(doc).to(device),
            torch.from_numpy(position).to(device),
            documents_done=documents_done,
        )

    # ------------------------------------------------------------ SAE metadata

    @classmethod
    def from_metadata(cls, source, model=None, **params):
        """The extractor of the activations an SAE was trained on, from its metadata.

        Parameters
        ----------
        source : SparseAutoencoder or dict
            A model read by `skSAE.io.load` (its ``metadata_``), or such a dict. The
            hook comes from ``hook`` and ``layer`` (skSAE's own), else ``hook_name``:
            TransformerLens names (``blocks.6.hook_resid_post``, ``hook_mlp_out``,
            ``hook_attn_out``, ``hook_resid_pre``), dictionary_learning's
            (``resid_post_layer_6``) or module paths (``layers.6``, sparsify's,
            ``model.layers.6.mlp``), else ``hf_hook_name``. ``context_size``,
            ``exclude_special_tokens``, ``drop_first_position`` and
            ``max_norm_ratio`` are taken over when present.
        model : str, path or transformers.PreTrainedModel, default=None
            The model; None means the metadata's ``model_name`` (which must then be
            a folder or hub name `transformers` can load here).
        **params
            Any other `ActivationExtractor` parameter, over the metadata's.

        Returns
        -------
        extractor : ActivationExtractor

        Examples
        --------
        >>> extractor = ActivationExtractor.from_metadata(
        ...     {"hook_name": "blocks.6.hook_mlp_out", "context_size": 64}, model="path/to/model")
        >>> extractor.hook, extractor.layer, extractor.context_size
        ('mlp_out', 6, 64)
        """
        metadata = getattr(source, "metadata_", source)
        if not isinstance(metadata, dict):
            raise ValueError(
                f"from_metadata expects a model read by skSAE.io.load or a dict, got "
                f"{type(source).__name__} without metadata_; pass hook= and layer= to "
                "ActivationExtractor instead."
            )
        if isinstance(metadata.get("hook"), str) and isinstance(metadata.get("layer"), int):
            hook, layer = metadata["hook"], metadata["layer"]
        else:
            name = metadata.get("hook_name") or metadata.get("hf_hook_name")
            if not isinstance(name, str):
                raise ValueError(
                    "The metadata names no hook (hook_name or hf_hook_name); pass hook= "
                    f"and layer= to ActivationExtractor. It has {sorted(metadata)}."
                )
            hook, layer = extractor_hook(name)
        model = metadata.get("model_name") if model is None else model
        if model is None:
            raise ValueError("The metadata names no model_name; pass model=.")
        loading = metadata.get("model_from_pretrained_kwargs")
        if isinstance(loading, dict) and loading.get("center_writing_weights"):
            warnings.warn(
                "The SAE was trained on a TransformerLens model loaded with "
                "center_writing_weights=True, whose residual stream is centred; the "
                "Hugging Face model's activations are not, so its codes will differ.",
                UserWarning,
                stacklevel=2,
            )
        settings = {"model": model, "hook": hook, "layer": layer}
        for name, kinds in (
            ("context_size", int),
            ("exclude_special_tokens", bool),
            ("drop_first_position", bool),
            ("max_norm_ratio", (int, float, type(None))),
        ):
            if name in metadata and isinstance(metadata[name], kinds):
                settings[name] = metadata[name]
        settings.update(params)
        return cls(**settings)

    def hook_metadata(self):
        """What an SAE trained on this extractor's rows should record about them.

        Pass it to `skSAE.io.save` (``**extractor.hook_metadata()``): the model, the
        hook in TransformerLens and Hugging Face spelling, and the extraction settings,
        so that `from_metadata` (or SAELens) finds the same activations. Loads the model.

        Returns
        -------
        metadata : dict
            ``model_name``, ``hook_name`` (TransformerLens spelling, or the module path
            for a module hook), ``hf_hook_name`` (the module's path in the model),
            ``hook``, ``layer``, ``context_size``, ``prepend_bos`` (whether the tokenizer
            adds a BOS token), ``exclude_special_tokens``, ``drop_first_position`` and
            ``max_norm_ratio``.
        """
        model, tokenizer = self.load()
        module = self._hook_module()
        hf_name = next(name for name, candidate in model.named_modules() if candidate is module)
        hook, layer = (self.hook, self.layer) if self.hook in HOOKS else extractor_hook(self.hook)
        ids = tokenizer("a")["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        return {
            "model_name": _model_name(self.model),
            "hook_name": transformer_lens_name(hook, layer) or hf_name,
            "hf_hook_name": hf_name,
            "hook": hook,
            "layer": layer,
            "context_size": self.context_size,
            "prepend_bos": bool(ids) and bos is not None and ids[0] == bos,
            "exclude_special_tokens": self.exclude_special_tokens,
            "drop_first_position": self.drop_first_position,
            "max_norm_ratio": self.max_norm_ratio,
        }

    # ----------------------------------------------------------------- loading

    def load(self):
        """The model and tokenizer, loaded at the first call and kept.

        They are loaded again when `model`, `tokenizer`, `device`, `dtype` or
        `cache_dir` changed since (with `set_params`).

        Returns
        -------
        model : transformers.PreTrainedModel
            `model_`, in eval mode on `device`, in `dtype`.
        tokenizer : transformers tokenizer
            `tokenizer_`.
        """
        # No fit is needed (requires_fit=False), so the parameters are validated here, on
        # every call: every use of the model (extraction, splicing, losses) goes through
        # load(), whether or not fit ran first, and whatever set_params did since.
        self._validate_params()
        loaded_with = (self.model, self.tokenizer, self.device, self.dtype, self.cache_dir)
        if getattr(self, "model_", None) is not None and (
            getattr(self, "_loaded_with", None) == loaded_with
        ):
            return self.model_, self.tokenizer_
        if self.model is None:
            raise ValueError(
                "model=None: pass a folder or hub name, a .gguf file or a loaded "
                "transformers model, e.g. ActivationExtractor(skSAE.corpora.smollm2_path())."
            )
        device = resolve_device(self.device)
        dtype = _DTYPES[self.dtype]
        model, tokenizer = _load_model(self.model, self.tokenizer, dtype, self.cache_dir)
        model.to(device)
        model.eval()
        self.model_ = model
        self.tokenizer_ = tokenizer
        self._loaded_with = loaded_with
        return model, tokenizer

    def _hook_module(self):
        """The module whose output is read or replaced, checked against the model."""
        model, _ = self.load()
        if self.hook not in HOOKS:
            modules = dict(model.named_modules())
            if self.hook in modules and self.hook != "":
                return modules[self.hook]
            raise ValueError(
                f"hook={self.hook!r} is neither one of {list(HOOKS)} nor a module of "
                f"{type(model).__name__}; module paths look like "
                f"{_example_paths(model)}."
            )
        blocks = _find_blocks(model)
        if self.layer >= len(blocks):
            raise ValueError(
                f"layer={self.layer} is out of range: {type(model).__name__} has "
                f"{len(blocks)} blocks, so layer must be in 0..{len(blocks) - 1}."
            )
        block = blocks[self.layer]
        if self.hook == "resid_post":
            return block
        names = ATTENTION_NAMES if self.hook == "attn_out" else MLP_NAMES
        children = dict(block.named_children())
        for name in names:
            if name in children:
                return children[name]
        available = [hook for hook in HOOKS if hook == "resid_post" or _has_child(block, hook)]
        raise ValueError(
            f"hook={self.hook!r} is not available for {type(block).__name__}; valid hooks "
            f"are {available}, or a module path such as {_example_paths(model)}."
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        if not _is_model_object(self.model):
            for name in ("model_", "tokenizer_", "_loaded_with"):
                state.pop(name, None)
        state["_sksae_version"] = __version__
        return state

    def __setstate__(self, state):
        pop_saved_version(state, "ActivationExtractor")
        self.__dict__.update(state)


def _extract_in_memory(extractor, key, texts):
    """Module-level so that joblib can cache it; ``key`` only feeds the cache's hash."""
    return extractor._extract_now(texts)


def _activations_at(extractor, key, texts, positions):
    """Module-level so that joblib can cache it; ``key`` only feeds the cache's hash."""
    rows = {}
    for batch in extractor.iter_batches(texts):
        hit = batch.position == positions[batch.doc_index]
        for doc, row in zip(batch.doc_index[hit], batch.activations[hit], strict=True):
            rows[int(doc)] = row
    found = np.zeros(len(texts), dtype=bool)
    found[list(rows)] = True
    if not rows:
        width = getattr(extractor.model_.config, "hidden_size", 0)
        return np.zeros((0, width), dtype=np.float32), found
    return np.stack([rows[doc] for doc in sorted(rows)]).astype(np.float32), found


def _baseline_cross_entropies(extractor, key, texts, ablation):
    """Module-level so that joblib can cache it; ``key`` only feeds the cache's hash."""
    replacement = extractor.ablation_replacement(texts, ablation)
    losses = extractor.spliced_losses(texts, {"ablated": replacement})
    return BaselineLosses(clean=losses.clean, ablated=losses.spliced["ablated"])


class _MeanReplacement:
    """Replace the hooked activation by a fixed mean vector (the "mean" ablation)."""

    def __init__(self, mean_D):
        self.mean_D = torch.from_numpy(mean_D)

    def __call__(self, hidden_BSD):
        return self.mean_D.to(hidden_BSD.device, hidden_BSD.dtype).expand_as(hidden_BSD)


def _has_child(block, hook):
    names = ATTENTION_NAMES if hook == "attn_out" else MLP_NAMES
    return any(name in dict(block.named_children()) for name in names)


def _example_paths(model):
    paths = [name for name, _ in model.named_modules() if name.count(".") == 3][:2]
    return paths or [name for name, _ in model.named_modules() if name][:2]


def _find_blocks(model):
    """The model's list of transformer blocks: the first ModuleList of num_hidden_layers."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(
        f"Could not find the list of {n_layers} blocks in {type(model).__name__}; pass "
        "hook='<module path>' instead."
    )


def _model_name(model):
    """The model as a name others can load: the path or hub name, or ``name_or_path``."""
    if _is_model_object(model):
        return getattr(model.config, "name_or_path", "") or type(model).__name__
    return os.fspath(model)


def _is_model_object(model):
    return isinstance(model, torch.nn.Module)


def _model_identity(model, dtype):
    """`extraction_key`'s ``model``: a path by name and content, a loaded model by weights."""
    if _is_model_object(model):
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        return f"{name} (weights sha256 {_weights_sha256(model, _DTYPES[dtype])[:16]})"
    return _path_identity(model)


def _weights_sha256(model, dtype):
    """SHA-256 of a model's state dict (names, shapes, dtypes and bytes) as run in ``dtype``.

    Floating-point tensors are hashed in ``dtype``, the precision `ActivationExtractor.load`
    casts the model to, so the digest is the same before and after that cast. One pass
    over the weights: about 1.2 s for SmolLM2-135M (540 MB in float32) on one core here.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _tokenizer_identity(tokenizer):
    """`extraction_key`'s ``tokenizer``: as `_model_identity`, a loaded one by its rules."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return _path_identity(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The backend's JSON holds the vocabulary, normaliser, pre-tokenizer and template;
    # a slow tokenizer has only its vocabulary.
    rules = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(rules.encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return f"{type(tokenizer).__name__} (sha256 {digest.hexdigest()[:16]})"


def _path_identity(name):
    """A local file or folder as its name and content digest; anything else as given."""
    if name is None or os.fspath(name) == "":
        return str(name)
    path = Path(os.fspath(name))
    if not path.exists():
        return str(name)
    return f"{path.resolve().name} (sha256 {_content_sha256(path)[:16]})"


def _content_sha256(path):
    """SHA-256 of a file's bytes, or of a folder's (relative name, file digest) pairs.

    A folder's hidden entries (``.git``, ``.cache``) are left out. Each file is read
    once per process (about 0.05-0.2 s for the 98 MB SmolLM2 GGUF file).
    """
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(f"{relative.as_posix()}\0{_content_sha256(file)}\0".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1024)
def _file_sha256(resolved, size, mtime_ns):
    """SHA-256 of a file; memoised on (path, size, mtime), so a rewrite is hashed again."""
    digest = hashlib.sha256()
    with open(resolved, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_texts(texts):
    if isinstance(texts, str):
        raise ValueError("Expected a list of texts, got a single str; wrap it in a list.")
    try:
        texts = list(texts)
    except TypeError as exc:
        raise ValueError(f"Expected a list of texts, got {type(texts).__name__}.") from exc
    if not texts:
        raise ValueError("Expected at least one text, got an empty list.")
    bad = [type(text).__name__ for text in texts if not isinstance(text, str)]
    if bad:
        raise ValueError(f"Expected every text to be a str, got {bad[0]} among them.")
    for index, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"texts[{index}] is not valid Unicode: it holds a lone surrogate "
                f"{text[exc.start]!r} at character {exc.start}, which no tokenizer can "
                "encode; decode the source with errors='replace' or drop the character."
            ) from None
    return texts


def _check_y(y):
    if y is not None:
        raise ValueError("ActivationExtractor takes no y: its rows are tokens, not texts.")


def _text_groups(texts, first_document):
    """Consecutive texts from ``first_document``, grouped for one call to the tokenizer.

    A group holds at most `_DOCUMENTS_PER_GROUP` texts and `_TOKENIZER_CHARS` characters;
    a longer text is a group of its own (`_long_text_ids` cuts it). Yields the index of
    each group's first text and the group.
    """
    start = first_document
    while start < len(texts):
        stop, n_chars = start + 1, len(texts[start])
        while (
            stop < len(texts)
            and stop - start < _DOCUMENTS_PER_GROUP
            and n_chars + len(texts[stop]) <= _TOKENIZER_CHARS
        ):
            n_chars += len(texts[stop])
            stop += 1
        yield start, texts[start:stop]
        start = stop


def _long_text_ids(tokenizer, text):
    """The token ids of a text longer than `_TOKENIZER_CHARS`, in bounded memory.

    The text is tokenised in windows of `_TOKENIZER_CHARS` characters, each starting a
    quarter window before the previous one ends. In each overlap, the tokens switch from
    one window's to the next's at the first character where both windows start a token,
    at least an eighth of a window (8,192 characters) inside both. A cut changes the
    tokens only near it (tokenizers split text at spaces and punctuation before merging),
    so the ids are those of the whole text, unless a stretch of 8,192 characters holds
    no token start common to both windows (one unbroken "word"): it is switched at its
    middle, and the tokens there may differ from the whole text's. A tokenizer without
    character offsets (``is_fast`` false) gets pieces cut before the last space of each
    window instead, whose tokens can differ from the whole text's at each cut (at most
    one per `_TOKENIZER_CHARS` characters).
    """
    if not getattr(tokenizer, "is_fast", False):
        ids, start = [], 0
        while start < len(text):
            stop = len(text)
            if stop - start > _TOKENIZER_CHARS:
                space = text.rfind(" ", start + 1, start + _TOKENIZER_CHARS)
                stop = space if space > 0 else start + _TOKENIZER_CHARS
            ids += tokenizer(text[start:stop], add_special_tokens=False)["input_ids"]
            start = stop
        return ids
    overlap = _TOKENIZER_CHARS // 4
    ids, starts = [], []  # the tokens so far, and the character each starts at
    start = 0
    while True:
        stop = min(len(text), start + _TOKENIZER_CHARS)
        window = tokenizer(text[start:stop], add_special_tokens=False, return_offsets_mapping=True)
        new_ids = list(window["input_ids"])
        new_starts = [start + first for first, _ in window["offset_mapping"]]
        if start > 0:  # the overlap is start..start + overlap; switch in its middle half
            low, high = start + overlap // 4, start + overlap - overlap // 4
            common = set(starts[bisect.bisect_left(starts, low) :]).intersection(
                first for first in new_starts if low <= first < high
            )
            switch = min(common, default=(low + high) // 2)
            kept = bisect.bisect_left(starts, switch)
            del ids[kept:], starts[kept:]
            taken = bisect.bisect_left(new_starts, switch)
            new_ids, new_starts = new_ids[taken:], new_starts[taken:]
        ids += new_ids
        starts += new_starts
        if stop == len(text):
            return ids
        start = stop - overlap


def _special_template(tokenizer):
    """Special token ids the tokenizer puts before and after a text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def _labels(batch):
    """Next-token labels of a batch: its token ids, with padding ignored (-100)."""
    return batch.input_ids_BS.masked_fill(batch.attention_mask_BS == 0, -100)


def _check_predictions(n_predictions):
    if n_predictions == 0:
        raise ValueError("The texts give no next-token prediction (each needs 2 tokens).")


def _cross_entropy_sum(logits_BSV, labels_BS):
    return float(
        torch.nn.functional.cross_entropy(
            logits_BSV[:, :-1].flatten(0, 1),
            labels_BS[:, 1:].flatten(),
            reduction="sum",
            ignore_index=-100,
        )
    )


def _kl_sum(clean_BSV, spliced_BSV, labels_BS):
    valid_BS = labels_BS[:, 1:] != -100
    clean_log_BSV = torch.log_softmax(clean_BSV[:, :-1], dim=-1)
    spliced_log_BSV = torch.log_softmax(spliced_BSV[:, :-1], dim=-1)
    kl_BS = (clean_log_BSV.exp() * (clean_log_BSV - spliced_log_BSV)).sum(dim=-1)
    return float(kl_BS[valid_BS].sum())


# -------------------------------------------------------------------- loading


def _gguf_key(gguf_path):
    """The converted copy's key: the first 16 hex digits of the file's SHA-256."""
    return _content_sha256(gguf_path)[:16]


def default_cache_dir():
    """Folder for converted models: ``$SKSAE_CACHE`` or ``~/.cache/skSAE``."""
    return Path(os.environ.get("SKSAE_CACHE", Path.home() / ".cache" / "skSAE"))


def _load_model(model, tokenizer, dtype, cache_dir):
    if _is_model_object(model):
        return model.to(dtype), _load_tokenizer(tokenizer, model.config.name_or_path)
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model={str(model)!r}: no such .gguf file.")
        path = _converted_gguf(path, Path(cache_dir) if cache_dir else default_cache_dir())
    return _auto_model(str(path), dtype), _load_tokenizer(tokenizer, str(path))


def _load_tokenizer(tokenizer, default):
    """A loaded tokenizer as is; otherwise load it from its path, or from ``default``."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default if tokenizer is None else tokenizer))


def _auto_model(name, dtype, **kwargs):
    """A causal LM where the config names one, else the bare model (e.g. BERT)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise ValueError(
            f"model={name!r} could not be loaded: not a local model folder, and the hub "
            f"is unreachable or has no such model ({exc})."
        ) from exc
    architectures = config.architectures or []
    causal = any(arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in architectures)
    auto = AutoModelForCausalLM if causal else AutoModel
    return auto.from_pretrained(name, dtype=dtype, **kwargs)


def _converted_gguf(gguf_path, cache_dir):
    """A safetensors copy of a GGUF model: parsed once (~15 s), then reloaded in < 1 s.

    The copy is keyed by the file's content (`_gguf_key`), not its path, so the same
    file in another folder (a new virtual environment) or under another name reuses it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = _gguf_key(gguf_path)
    for folder in sorted(cache_dir.glob(f"*-{key}")):
        if (folder / "config.json").is_file():
            return folder
    target = cache_dir / f"{gguf_path.stem}-{key}"
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers refuses to save a model that still carries the GGUF quantizer marker;
    # the weights are already dequantised, so dropping it changes nothing.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():  # converted meanwhile by another process
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.replace(target)
    return target
