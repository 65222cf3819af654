"""Top-activating examples of latents: one streaming pass over a corpus, then windows.

`top_activating_examples` reads a corpus in one streaming pass and reports, for each
requested latent, the tokens it fires most on (with their context, recorded during the
pass), samples from lower activation quantiles, its firing density and activation
histogram, and the tokens its decoder direction promotes and suppresses through the
model's final norm and unembedding. Public through `skSAE.interpret`;
`skSAE.dashboard` builds on `collect_reports`, which can also follow every latent and
measure the overview statistics in the same pass, or read an extraction already in
memory instead of the extractor.

Shape suffixes::

    N rows of X (tokens, flattened)   B minibatch rows        S sequence positions
    D n_features (d_model, SAE input) F n_components (latents) L requested latents
    K kept examples per latent (top-k) R reservoir slots       V vocabulary
    C candidate rows of a batch (those that can enter a top-k or the reservoir)
    W window tokens (before + 1 + after)  T rows of a batch with the tail before it
    E entries picked from a larger array (fired codes, slots, ...)
"""

import sys
from numbers import Integral
from typing import NamedTuple

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ._data import CHUNK_BYTES
from ._diagnostics import DiagnosticsAccumulator
from ._estimator import check_input_width, inference_module
from ._sklearn_compat import HasMethods, Interval, validate_params
from ._utils import resolve_device
from ._validation import check_latents, invalid_parameter

__all__ = [
    "ActivatingExample",
    "CorpusReports",
    "LatentReport",
    "collect_reports",
    "logit_lens_directions",
    "token_texts",
    "top_activating_examples",
]

# Bins of each latent's activation histogram (before trailing empty bins are trimmed).
_HISTOGRAM_BINS = 64
# Non-zero activations kept per latent, uniformly at random, for the quantile samples.
_RESERVOIR_SIZE = 64
# Activation quantile intervals sampled below the top examples, highest first.
_QUANTILE_EDGES = (1.0, 0.75, 0.5, 0.25, 0.0)
# Rows encoded at once when reading an extraction in memory: a default extractor batch
# (8 contexts of 128 tokens), so memory stays that of the extractor's own pass.
_CHUNK_ROWS = 1024
# Token keys are text * _KEY_SPAN + position (positions stay far below 2**32).
_KEY_SPAN = 2**32
# Names of the final norm on the base model (Llama/Mistral/Qwen, GPT-2, OPT, Falcon, ...).
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


class ActivatingExample(NamedTuple):
    """One token on which a latent fires, with the text around it."""

    activation: float
    """The latent's value at the marked token."""
    doc_index: int
    """Index of the text the token comes from."""
    position: int
    """Index of the token within its text's tokens (as `Extraction.position`)."""
    tokens: list
    """Text of each token of a window around the marked token, from the same text only
    (`token_texts`: a byte of a character split over tokens shows as ``<0xE2>``)."""
    token_activations: list
    """The latent's value on each window token (0.0 where it did not fire, and on tokens
    the extractor drops: special tokens and the first position of each context)."""
    marked: int
    """Index in `tokens` of the activating token."""


class LatentReport(NamedTuple):
    """What `top_activating_examples` found out about one latent."""

    latent: int
    """Index of the latent (row of `components_`)."""
    density: float
    """Fraction of the kept tokens on which the latent fires (code > 0)."""
    max_activation: float
    """Largest value of the latent over the corpus (0.0 when it never fires)."""
    top: list
    """`ActivatingExample`s of the highest activations, descending, at most ``k``."""
    quantiles: list
    """``(label, examples)`` pairs, e.g. ``("50-75%", [...])``: examples drawn at random
    from quantile intervals of the latent's non-zero activations, highest interval first."""
    histogram: tuple
    """``(counts, bin_edges)`` of the latent's non-zero activations (exact counts)."""
    promoted: list
    """``(token, logit change)`` pairs: the tokens whose logits the decoder direction raises
    most through the final norm's weight and the unembedding (`logit_lens_directions`),
    highest first; ``[]`` when the model has no language-model head. Tokens are their
    own text (`token_texts`), so ``" the"`` and ``"the"`` differ."""
    suppressed: list
    """Same, for the tokens it lowers most."""


@validate_params(
    {
        "sae": [HasMethods(["transform", "inverse_transform"])],
        "extractor": [HasMethods(["iter_batches", "load"])],
        "texts": ["array-like"],
        "latents": [Integral, "array-like"],
        "k": [Interval(Integral, 1, None, closed="left")],
        "window": [tuple, list],
        "n_quantile_samples": [Interval(Integral, 0, None, closed="left")],
        "n_logit_tokens": [Interval(Integral, 0, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    },
    prefer_skip_nested_validation=True,
)
def top_activating_examples(
    sae,
    extractor,
    texts,
    latents,
    *,
    k=10,
    window=(8, 4),
    n_quantile_samples=3,
    n_logit_tokens=10,
    random_state=0,
    verbose=0,
):
    """Top-activating tokens, quantile samples, density and logit effects of latents.

    All requested latents are measured in one streaming pass over ``texts``: each batch
    of activations is encoded by the SAE and merged into running per-latent state (the
    ``k`` largest activations, a uniform random sample of the non-zero activations,
    firing counts and a histogram), so memory depends on the number of latents, not on
    the corpus size. The latents' values on the tokens around each kept example are
    recorded in the same pass, so the model reads each text once. With ``memory=`` set
    on the extractor, the rows come from its cached extraction instead (computed and
    cached first when missing; it is then held in memory), so the model does not run
    when the same texts were extracted before.

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted on activations of ``extractor``'s hook.
    extractor : ActivationExtractor
        The model and hook point; its rules decide which tokens are read (special tokens
        and the first position of each context are skipped by default).
    texts : list of str
        The corpus.
    latents : int or sequence of int
        Latents to report on, each in ``0 .. n_components - 1``.
    k : int, default=10
        Top examples per latent.
    window : tuple of (int, int), default=(8, 4)
        Tokens shown before and after each example's token.
    n_quantile_samples : int, default=3
        Examples drawn from each quartile of the non-zero activations; 0 for none.
    n_logit_tokens : int, default=10
        Promoted and suppressed tokens listed per latent; 0 for none.
    random_state : int, RandomState instance or None, default=0
        Seeds the sampling of the quantile examples.
    verbose : int or bool, default=0
        Progress bar (stdout) over the tokens read.

    Returns
    -------
    reports : dict of int to LatentReport
        One report per latent, in the order requested.

    Raises
    ------
    ValueError
        When a latent is not an integer in range, another argument is not of its
        documented type or range, or the SAE's input width differs from the hook's.

    Notes
    -----
    Promoted and suppressed tokens are the "logit lens" of the decoder direction
    ``d = components_[latent]``: ``W_U @ (g * d)``, with ``W_U`` the model's output
    embedding (the input embedding when they are tied, as in SmolLM2) and ``g`` the
    elementwise weight of the final norm (RMSNorm in Llama/SmolLM2; GPT-2's LayerNorm
    also centres ``d``). This is the direct effect on the logits of adding the direction
    to the residual stream, per unit of the residual's scale (the norm divides by it, a
    positive factor shared by all tokens), ignoring every later block. It is most
    meaningful for ``hook="resid_post"``, ``"attn_out"`` and ``"mlp_out"``, whose
    outputs are added to the residual stream.

    Quantile samples come from a uniform random sample of up to 64 non-zero
    activations per latent (a bottom-k sketch of random keys), so their quantile
    intervals are estimates; the histogram counts are exact. Each (token, latent) gets
    its random key from a hash of ``random_state``, so a latent's sample does not depend
    on how the corpus is batched or which other latents are reported.

    Tokens are shown by `token_texts`: a byte-level BPE token (GPT-2, SmolLM2) is the
    text of its own bytes, a byte of a character split over tokens its hex
    (``<0xE2>``) instead of ``�``.

    Examples
    --------
    >>> from skSAE.interpret import top_activating_examples
    >>> reports = top_activating_examples(sae, extractor, texts, [3, 7])  # doctest: +SKIP
    >>> reports[3].top[0].tokens  # doctest: +SKIP
    """
    check_is_fitted(sae)
    texts = list(texts)  # each is checked by the extractor
    latents = check_latents(latents, sae.components_.shape[0], "latents", "top_activating_examples")
    _check_window(window)
    # With memory= the extraction is the cached one (or is cached for the next call).
    extraction = extractor.extract(texts) if getattr(extractor, "memory", None) else None
    return collect_reports(
        sae,
        extractor,
        texts,
        latents,
        k=k,
        window=window,
        n_quantile_samples=n_quantile_samples,
        n_logit_tokens=n_logit_tokens,
        random_state=random_state,
        verbose=verbose,
        extraction=extraction,
    ).reports


class CorpusReports(NamedTuple):
    """What `collect_reports` measured in its pass over a corpus."""

    reports: dict
    """One `LatentReport` per latent, in the order chosen."""
    overview: dict
    """Statistics of every latent on the corpus when the latents were chosen after the
    pass: ``n_tokens``, ``l0``, ``explained_variance``, ``silent_fraction`` and ``density``
    (array of shape (n_components,)); None when they were given."""


def collect_reports(
    sae,
    extractor,
    texts,
    latents,
    *,
    k=10,
    window=(8, 4),
    n_quantile_samples=3,
    n_logit_tokens=10,
    random_state=0,
    verbose=0,
    extraction=None,
):
    """`top_activating_examples` on checked arguments, in one pass over the corpus.

    For package code (the dashboard). ``latents`` is a checked list of ints, or a
    callable that chooses them once the pass is over from the firing frequency of every
    latent (an array of shape (n_components,)); then every latent is followed during the
    pass (memory grows with ``n_components``, not with the corpus) and the overview
    statistics of `CorpusReports` are measured in the same pass. The latents' values on
    the tokens around each kept example are recorded while the pass goes, so the model
    reads each text once. When ``extraction`` (an `Extraction` of ``texts`` by
    ``extractor``) is given, its rows are read instead of running the model, and the
    model only gives the weights of the logit effects. The reports are those of the
    extractor's pass up to float rounding, except the histogram's bin edges, which
    depend on where the batches split the rows (the counts stay exact).
    """
    rng = check_random_state(random_state)
    # The reservoir's keys hash each (token, latent) with this seed, so a latent's sample
    # depends neither on the batches nor on which other latents are followed.
    seed = int(rng.randint(np.iinfo(np.int32).max))
    model, tokenizer = extractor.load()
    device = resolve_device(sae.device)
    module = inference_module(sae, device)
    n_components = sae.components_.shape[0]
    choose = latents if callable(latents) else None
    followed = list(range(n_components)) if choose is not None else list(latents)
    columns_L = None if choose is not None else torch.tensor(followed, device=device)
    if extraction is None:
        batches = _extractor_batches(extractor, texts)
    else:
        batches = _extraction_batches(extraction)
    state = _RunningState(
        np.array(followed, dtype=np.int64),
        k,
        _RESERVOIR_SIZE if n_quantile_samples else 0,
        window,
        seed,
    )
    totals = DiagnosticsAccumulator(sae) if choose is not None else None
    # Rows encoded at once: the codes of all latents stay within one data chunk.
    chunk_rows = max(1, CHUNK_BYTES // (4 * n_components))
    progress = tqdm(disable=not verbose, file=sys.stdout, unit="tok", desc="top activations")
    try:
        with torch.inference_mode():
            for acts_ND, doc_N, position_N in batches:
                if len(acts_ND) == 0:
                    continue
                check_input_width(sae, acts_ND)
                for start in range(0, len(acts_ND), chunk_rows):
                    stop = start + chunk_rows
                    x_ND = torch.from_numpy(acts_ND[start:stop]).to(device)
                    codes_NF = module.encode(x_ND)
                    if totals is not None:
                        totals.update(x_ND, codes_NF, module.decode(codes_NF))
                        codes_NL = codes_NF.cpu()
                    else:
                        codes_NL = codes_NF.index_select(1, columns_L).cpu()
                    state.update(
                        codes_NL,
                        torch.from_numpy(np.asarray(doc_N[start:stop], dtype=np.int64)),
                        torch.from_numpy(np.asarray(position_N[start:stop], dtype=np.int64)),
                    )
                progress.update(len(acts_ND))
    finally:
        progress.close()
    if state.n_rows == 0:
        raise ValueError(
            "No token was kept: the texts are too short once special tokens and the first "
            "position of each context are dropped."
        )

    overview = None
    if choose is None:
        columns = list(range(len(followed)))
    else:
        measured = totals.result(dictionary=False)
        overview = {
            "n_tokens": measured["n_tokens"],
            "l0": measured["mean_l0"],
            "explained_variance": measured["explained_variance"],
            "silent_fraction": measured["silent_fraction"],
            "density": measured["latent_density"],
        }
        latents = list(choose(overview["density"]))
        columns = latents  # every latent is followed: its column is its index
    tops = state.top_examples(columns)
    quantiles = state.quantile_examples(columns, n_quantile_samples, rng, tops)
    windows = _Windows(tokenizer, texts, *window)
    logits = _logit_effects(model, tokenizer, sae.components_[latents], n_logit_tokens)

    reports = {}
    for i, (column, latent) in enumerate(zip(columns, latents, strict=True)):
        reports[latent] = LatentReport(
            latent=latent,
            density=float(state.fires_L[column]) / state.n_rows,
            max_activation=tops[i][0][0] if tops[i] else 0.0,
            top=[windows.example(*example) for example in tops[i]],
            quantiles=[
                (label, [windows.example(*example) for example in examples])
                for label, examples in quantiles[i]
            ],
            histogram=state.histogram(column),
            promoted=logits[i][0],
            suppressed=logits[i][1],
        )
    return CorpusReports(reports, overview)


def _check_window(window):
    """A pair of ints >= 0, or the ValueError of `top_activating_examples`."""
    if len(window) != 2 or not all(
        isinstance(v, Integral) and not isinstance(v, bool) and v >= 0 for v in window
    ):
        raise invalid_parameter(
            "window",
            "top_activating_examples",
            "a pair of ints >= 0 (tokens before, tokens after)",
            repr(window),
        )


def _extractor_batches(extractor, texts):
    """(activations, doc_index, position) of each batch of the extractor's forward pass.

    Not a generator itself: `ActivationExtractor.iter_batches` checks the texts at once.
    """
    return (
        (batch.activations, batch.doc_index, batch.position)
        for batch in extractor.iter_batches(texts)
    )


def _extraction_batches(extraction):
    """The same, from an extraction in memory, `_CHUNK_ROWS` rows at a time."""
    for start in range(0, len(extraction.activations), _CHUNK_ROWS):
        stop = start + _CHUNK_ROWS
        yield (
            extraction.activations[start:stop],
            extraction.doc_index[start:stop],
            extraction.position[start:stop],
        )


class _Kept:
    """Kept rows of each latent: a score (ranking), value, origin and window per slot.

    Arrays have shape (K, L) (slot, latent column); windows (K, L, W) hold the latent's
    value on the tokens at offsets ``-before .. after`` of the slot's token, and
    ``pending_KLW`` marks offsets whose token has not been read yet (a later batch).
    """

    def __init__(self, n_latents, width, score_dtype):
        self.score_KL = torch.empty(0, n_latents, dtype=score_dtype)
        self.value_KL = torch.empty(0, n_latents)
        self.doc_KL = torch.empty(0, n_latents, dtype=torch.int64)
        self.position_KL = torch.empty(0, n_latents, dtype=torch.int64)
        self.window_KLW = torch.empty(0, n_latents, width)
        self.pending_KLW = torch.empty(0, n_latents, width, dtype=torch.bool)

    def merge(self, scores_NL, values_NL, context, n_keep, *, largest):
        """Keep the ``n_keep`` best of the kept rows and the batch's, per latent."""
        n_old = self.score_KL.shape[0]
        rows_C = torch.arange(scores_NL.shape[0])
        if n_old == n_keep:
            # Only rows that beat some latent's current worst kept score can enter:
            # after the first batches, a small part of each batch.
            worst_L = self.score_KL[-1]
            beats_NL = scores_NL > worst_L if largest else scores_NL < worst_L
            rows_C = torch.nonzero(beats_NL.any(dim=1)).flatten()
            if len(rows_C) == 0:
                return
        all_KL = torch.cat([self.score_KL, scores_NL[rows_C]])
        merged_KL, index_KL = all_KL.topk(min(n_keep, all_KL.shape[0]), dim=0, largest=largest)
        from_batch_KL = index_KL >= n_old
        row_KL = rows_C[(index_KL - n_old).clamp_min(0)]  # the batch's own row numbers
        doc_KL = context.doc_N[row_KL]
        position_KL = context.position_N[row_KL]
        value_KL = values_NL.gather(0, row_KL)
        width = self.window_KLW.shape[2]
        window_KLW = torch.zeros(*index_KL.shape, width)
        pending_KLW = torch.zeros(*index_KL.shape, width, dtype=torch.bool)
        if n_old:
            old_KL = index_KL.clamp_max(n_old - 1)
            old_KLW = old_KL[..., None].expand(-1, -1, width)
            doc_KL = torch.where(from_batch_KL, doc_KL, self.doc_KL.gather(0, old_KL))
            position_KL = torch.where(
                from_batch_KL, position_KL, self.position_KL.gather(0, old_KL)
            )
            value_KL = torch.where(from_batch_KL, value_KL, self.value_KL.gather(0, old_KL))
            window_KLW = self.window_KLW.gather(0, old_KLW)
            pending_KLW = self.pending_KLW.gather(0, old_KLW)
        # Windows of the new rows that can be shown: a firing in the top-k, a sampled
        # firing (finite key) in the reservoir; the filler slots of rare latents need none.
        shown_KL = merged_KL > 0 if largest else torch.isfinite(merged_KL)
        slot_E, column_E = torch.nonzero(from_batch_KL & shown_KL, as_tuple=True)
        if len(slot_E):
            window_EW, pending_EW = context.windows(row_KL[slot_E, column_E], column_E)
            window_KLW[slot_E, column_E] = window_EW
            pending_KLW[slot_E, column_E] = pending_EW
        self.score_KL, self.value_KL = merged_KL, value_KL
        self.doc_KL, self.position_KL = doc_KL, position_KL
        self.window_KLW, self.pending_KLW = window_KLW, pending_KLW

    def resolve(self, context):
        """Fill the pending window values whose tokens this batch holds."""
        if not self.pending_KLW.any():
            return
        slot_E, column_E, offset_E = torch.nonzero(self.pending_KLW, as_tuple=True)
        key_E = _token_keys(self.doc_KL[slot_E, column_E], self.position_KL[slot_E, column_E])
        key_E1 = (key_E + context.offsets_W[offset_E])[:, None]
        values_E1, pending_E1 = context.lookup(
            key_E1, column_E, torch.ones_like(key_E1, dtype=torch.bool)
        )
        self.window_KLW[slot_E, column_E, offset_E] = values_E1[:, 0]
        self.pending_KLW[slot_E, column_E, offset_E] = pending_E1[:, 0]

    def entries(self, column, valid_K=None):
        """(value, doc, position, window) of one latent's slots, in slot order."""
        keep_K = (
            torch.ones(self.score_KL.shape[0], dtype=torch.bool) if valid_K is None else valid_K
        )
        return list(
            zip(
                self.value_KL[keep_K, column].tolist(),
                self.doc_KL[keep_K, column].tolist(),
                self.position_KL[keep_K, column].tolist(),
                list(self.window_KLW[keep_K, column].numpy()),
                strict=True,
            )
        )


class _Context:
    """A batch's rows with the last rows before it, to read window values from.

    Rows arrive in (text, position) order, and a text's tokens within ``before`` positions
    of a row are at most the ``before`` rows just before it, so those rows of earlier
    batches (the tail) complete every window's left side.
    """

    def __init__(self, tail_key_T, tail_codes_TL, codes_NL, doc_N, position_N, offsets_W):
        self.doc_N = doc_N
        self.position_N = position_N
        self.offsets_W = offsets_W
        self.n_tail = len(tail_key_T)
        self.key_T = torch.cat([tail_key_T, _token_keys(doc_N, position_N)])
        self.codes_TL = torch.cat([tail_codes_TL, codes_NL])

    def windows(self, row_E, column_E):
        """Window values (E, W) of batch rows in latent columns, and which are pending."""
        key_EW = self.key_T[row_E + self.n_tail][:, None] + self.offsets_W
        valid_EW = (self.position_N[row_E][:, None] + self.offsets_W) >= 0
        return self.lookup(key_EW, column_E, valid_EW)

    def lookup(self, key_EW, column_E, valid_EW):
        """Values at token keys (0 where the token has no row), and the keys not read yet."""
        index_EW = torch.searchsorted(self.key_T, key_EW).clamp_max(len(self.key_T) - 1)
        found_EW = (self.key_T[index_EW] == key_EW) & valid_EW
        values_EW = self.codes_TL[index_EW, column_E[:, None]]
        values_EW = torch.where(found_EW, values_EW, torch.zeros((), dtype=values_EW.dtype))
        pending_EW = valid_EW & ~found_EW & (key_EW > self.key_T[-1])
        return values_EW, pending_EW

    def tail(self, n_rows):
        """The last ``n_rows`` keys and codes, for the next batch's context."""
        start = max(0, len(self.key_T) - n_rows)
        return self.key_T[start:].clone(), self.codes_TL[start:].clone()


def _token_keys(doc, position):
    """One int64 per token, increasing in (text, position) order."""
    return doc * _KEY_SPAN + position


def _sample_keys(seed, doc_E, position_E, latent_E):
    """Uniform keys in [0, 1), a hash of (seed, text, position, latent) (splitmix64 steps)."""
    x_E = np.full(len(doc_E), seed, dtype=np.uint64)
    for part_E in (doc_E, position_E, latent_E):
        x_E = _mix64(x_E + np.asarray(part_E).astype(np.uint64))
    return (x_E >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _mix64(x_E):
    """A bijective scramble of uint64s (the splitmix64 finaliser; Steele et al. 2014)."""
    x_E = x_E + np.uint64(0x9E3779B97F4A7C15)
    x_E = (x_E ^ (x_E >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x_E = (x_E ^ (x_E >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x_E ^ (x_E >> np.uint64(31))


class _RunningState:
    """Per-latent running statistics over batches of codes (all on the CPU)."""

    def __init__(self, latents_L, k, reservoir_size, window, seed):
        n_latents = len(latents_L)
        before, after = window
        self.latents_L = latents_L
        self.k = k
        self.reservoir_size = reservoir_size
        self.before = before
        self.seed = seed
        self.offsets_W = torch.arange(-before, after + 1)
        self.n_rows = 0
        self.fires_L = torch.zeros(n_latents, dtype=torch.int64)
        # Top-k by activation, merged with each batch by torch.topk.
        self.top = _Kept(n_latents, len(self.offsets_W), torch.float32)
        # Reservoir: the non-zero activations with the smallest random keys, a uniform
        # sample without replacement that merges batch by batch like the top-k.
        self.sample = _Kept(n_latents, len(self.offsets_W), torch.float64)
        self.tail_key_T = torch.empty(0, dtype=torch.int64)
        self.tail_codes_TL = torch.empty(0, n_latents)
        # Histogram over [0, upper_L] in equal bins; upper doubles (merging bin pairs)
        # whenever a larger activation arrives, so the counts stay exact.
        self.upper_L = torch.zeros(n_latents, dtype=torch.float64)
        self.counts_LH = torch.zeros(n_latents, _HISTOGRAM_BINS, dtype=torch.int64)

    def update(self, codes_NL, doc_N, position_N):
        self.n_rows += codes_NL.shape[0]
        fired_NL = codes_NL > 0
        self.fires_L += fired_NL.sum(dim=0)
        codes_NL = codes_NL.float()
        context = _Context(
            self.tail_key_T, self.tail_codes_TL, codes_NL, doc_N, position_N, self.offsets_W
        )
        self.top.resolve(context)
        self.top.merge(codes_NL, codes_NL, context, self.k, largest=True)
        if self.reservoir_size:
            self.sample.resolve(context)
            row_E, column_E = torch.nonzero(fired_NL, as_tuple=True)
            key_NL = torch.full(codes_NL.shape, float("inf"), dtype=torch.float64)
            key_NL[row_E, column_E] = torch.from_numpy(
                _sample_keys(
                    self.seed,
                    doc_N[row_E].numpy(),
                    position_N[row_E].numpy(),
                    self.latents_L[column_E.numpy()],
                )
            )
            self.sample.merge(key_NL, codes_NL, context, self.reservoir_size, largest=False)
        self.tail_key_T, self.tail_codes_TL = context.tail(self.before)
        self._update_histogram(codes_NL, fired_NL)

    def _update_histogram(self, codes_NL, fired_NL):
        row_E, column_E = torch.nonzero(fired_NL, as_tuple=True)
        values_E = codes_NL[row_E, column_E].double()
        if len(values_E) == 0:
            return
        batch_max_L = torch.zeros_like(self.upper_L).scatter_reduce(
            0, column_E, values_E, reduce="amax"
        )
        first_L = (self.upper_L == 0) & (batch_max_L > 0)
        self.upper_L[first_L] = batch_max_L[first_L]
        grow_L = batch_max_L > self.upper_L
        if grow_L.any():
            # Doublings needed so that upper covers the batch's maximum; merging 2**d
            # adjacent bins keeps every count exact.
            ratio_L = batch_max_L[grow_L] / self.upper_L[grow_L]
            doublings_L = torch.ceil(torch.log2(ratio_L)).long().clamp_min(1)
            too_small_L = self.upper_L[grow_L] * 2.0**doublings_L < batch_max_L[grow_L]
            doublings_L += too_small_L.long()  # log2 rounding
            columns = torch.nonzero(grow_L).flatten()
            for doublings in doublings_L.unique().tolist():
                chosen = columns[doublings_L == doublings]
                factor = min(2**doublings, _HISTOGRAM_BINS)
                merged_LH = self.counts_LH[chosen].reshape(len(chosen), -1, factor).sum(dim=2)
                counts_LH = torch.zeros(len(chosen), _HISTOGRAM_BINS, dtype=torch.int64)
                counts_LH[:, : merged_LH.shape[1]] = merged_LH
                self.counts_LH[chosen] = counts_LH
                self.upper_L[chosen] *= 2.0**doublings
        width_E = self.upper_L[column_E] / _HISTOGRAM_BINS
        bin_E = torch.floor(values_E / width_E).long().clamp(0, _HISTOGRAM_BINS - 1)
        self.counts_LH += torch.bincount(
            column_E * _HISTOGRAM_BINS + bin_E, minlength=self.counts_LH.numel()
        ).reshape(self.counts_LH.shape)

    def histogram(self, column):
        counts_H = self.counts_LH[column].numpy()
        upper = float(self.upper_L[column])
        if upper == 0.0:
            return np.zeros(0, dtype=np.int64), np.zeros(1)
        n_bins = int(np.flatnonzero(counts_H)[-1]) + 1  # trim trailing empty bins
        edges = np.arange(n_bins + 1) * (upper / _HISTOGRAM_BINS)
        return counts_H[:n_bins].copy(), edges

    def top_examples(self, columns):
        """Per column: (activation, doc, position, window) of the top activations above 0."""
        return [[entry for entry in self.top.entries(column) if entry[0] > 0] for column in columns]

    def quantile_examples(self, columns, n_samples, rng, tops):
        """Per column: (label, examples) for each quartile of the sampled activations."""
        result = []
        for column, top in zip(columns, tops, strict=True):
            if n_samples == 0 or self.sample.score_KL.shape[0] == 0:
                result.append([])
                continue
            entries = self.sample.entries(column, torch.isfinite(self.sample.score_KL[:, column]))
            if not entries:
                result.append([])
                continue
            values_R = np.array([entry[0] for entry in entries], dtype=np.float32)
            # The top examples are shown already; sample the rest of each interval.
            in_top = {(doc, position) for _, doc, position, _ in top}
            fresh_R = np.array([(e[1], e[2]) not in in_top for e in entries], dtype=bool)
            cuts = np.quantile(values_R, _QUANTILE_EDGES)
            intervals = []
            for i, (high, low) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
                inside = (values_R >= low) & ((values_R < high) if i else (values_R <= high))
                inside &= fresh_R
                candidates = np.flatnonzero(inside)
                chosen = rng.permutation(candidates)[:n_samples]
                chosen = chosen[np.argsort(-values_R[chosen], kind="stable")]
                label = f"{round(100 * _QUANTILE_EDGES[i + 1])}-{round(100 * _QUANTILE_EDGES[i])}%"
                intervals.append((label, [entries[j] for j in chosen]))
            result.append(intervals)
        return result


class _Windows:
    """Builds `ActivatingExample`s: the tokens around a position, with their values."""

    def __init__(self, tokenizer, texts, before, after):
        self.tokenizer = tokenizer
        self.texts = texts
        self.before = before
        self.after = after
        self.byte_level = _is_byte_level(tokenizer)
        self._ids = {}

    def example(self, activation, doc, position, window_W):
        if doc not in self._ids:
            self._ids[doc] = self.tokenizer(self.texts[doc], add_special_tokens=False)["input_ids"]
        ids = self._ids[doc]
        start = max(0, position - self.before)
        stop = min(len(ids), position + self.after + 1)
        offset = self.before - position  # window index of position 0
        return ActivatingExample(
            activation=activation,
            doc_index=doc,
            position=position,
            tokens=token_texts(self.tokenizer, ids[start:stop], byte_level=self.byte_level),
            token_activations=[float(window_W[p + offset]) for p in range(start, stop)],
            marked=position - start,
        )


def token_texts(tokenizer, ids, *, byte_level=None):
    """Each token's text, readable on its own and never a replacement character.

    A byte-level BPE token (GPT-2, SmolLM2) is its own string
    (``convert_ids_to_tokens``) mapped back to the bytes it stands for (``Ġ`` is a
    space, ``Ċ`` a newline): the bytes that form UTF-8 characters show as those
    characters, and a byte of a character split over several tokens as its hex,
    ``<0xE2>``, where decoding the token alone gives ``�``. Other tokenizers
    (SentencePiece, WordPiece, character vocabularies) give the text that
    ``decode(ids[:i + 1])`` adds to ``decode(ids[:i])``, which keeps the leading spaces
    that SentencePiece drops from lone tokens; a piece that would hold ``�`` is the
    token's own string instead.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    ids : list of int
        Consecutive token ids (a window of a text, or one token).
    byte_level : bool, default=None
        Whether the tokenizer is byte-level; None looks it up (`_is_byte_level`).

    Returns
    -------
    tokens : list of str
    """
    if byte_level is None:
        byte_level = _is_byte_level(tokenizer)
    ids = [int(i) for i in ids]
    if byte_level:
        return [_byte_level_text(token) for token in tokenizer.convert_ids_to_tokens(ids)]
    tokens = []
    previous = ""
    for i, token_id in enumerate(ids):
        current = tokenizer.decode(ids[: i + 1])
        piece = current[len(previous) :] if current.startswith(previous) else "\ufffd"
        if "\ufffd" in piece or not piece:
            piece = tokenizer.decode([token_id])
        if "\ufffd" in piece or not piece:
            piece = tokenizer.convert_ids_to_tokens(token_id) or f"<{token_id}>"
        tokens.append(piece)
        previous = current
    return tokens


def _is_byte_level(tokenizer):
    """Whether a (fast) tokenizer's decoder maps characters back to bytes, as GPT-2's."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    return '"ByteLevel"' in decoder.__getstate__().decode("utf-8", errors="replace")


def _byte_alphabet():
    """{character: byte} of byte-level BPE vocabularies (Radford et al. 2019, GPT-2).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, 0x7F-0xA0
    and the soft hyphen) are shifted, in byte order, to U+0100 onwards (``Ġ`` is the
    space, ``Ċ`` the newline).
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char_of_byte = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in char_of_byte)
    char_of_byte.update({byte: chr(0x100 + i) for i, byte in enumerate(shifted)})
    return {char: byte for byte, char in char_of_byte.items()}


_BYTE_OF_CHAR = _byte_alphabet()


def _byte_level_text(token):
    """A byte-level token's text: its bytes as UTF-8, a byte that is no character as hex."""
    if token is None:
        return ""
    data = b"".join(
        bytes([_BYTE_OF_CHAR[c]]) if c in _BYTE_OF_CHAR else c.encode("utf-8") for c in token
    )
    parts = []
    i = 0
    while i < len(data):
        for size in (1, 2, 3, 4):
            try:
                parts.append(data[i : i + size].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i += size
            break
        else:
            parts.append(f"<0x{data[i]:02X}>")
            i += 1
    return "".join(parts)


def _final_norm(model):
    """The normalisation between the last block and the unembedding, or None."""
    base = getattr(model, "base_model", model)
    for name in _FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def logit_lens_directions(model, directions_LD):
    """Directions as the unembedding sees them: through the final norm's gain.

    The final norm divides the residual by its scale (a positive factor, the same for
    every token of the vocabulary) and multiplies it elementwise by its gain; a
    LayerNorm (GPT-2) also removes the mean over ``d_model``, which is linear. The
    direction's direct effect on the logits is then approximately ``W_U @ (gain *
    centred direction)`` per unit of residual scale (leaving out how the direction
    changes the scale itself). The gain is measured on the module, not read from its
    ``weight``: the output for an alternating vector ``+-c`` (mean 0, scale ``c``) minus
    that for its negation, halved, is the gain whatever the parametrisation (``weight``
    for Llama's RMSNorm and GPT-2's LayerNorm, ``1 + weight`` for Gemma's; a bias
    cancels). Without a known final norm, the direction is returned as is.
    """
    norm = _final_norm(model)
    if norm is None:
        return directions_LD
    name = type(norm).__name__
    if isinstance(norm, torch.nn.LayerNorm) or ("LayerNorm" in name and "RMS" not in name):
        directions_LD = directions_LD - directions_LD.mean(dim=1, keepdim=True)
    return directions_LD * _norm_gain(norm, directions_LD.shape[1]).to(directions_LD)


def _norm_gain(norm, n_features, scale=1000.0):
    """The elementwise gain of a normalisation module (see `logit_lens_directions`)."""
    parameter = next(norm.parameters(), None)
    dtype = torch.float32 if parameter is None else parameter.dtype
    device = "cpu" if parameter is None else parameter.device
    sign_D = torch.ones(n_features, dtype=torch.float32)
    sign_D[1::2] = -1.0
    probe_2D = torch.stack([sign_D, -sign_D]).mul(scale).to(device, dtype)
    with torch.inference_mode():
        out_2D = norm(probe_2D).float().cpu()
    return (out_2D[0] - out_2D[1]) / 2 * sign_D


def _logit_effects(model, tokenizer, directions_LD, n_tokens):
    """Per direction: (promoted, suppressed) lists of (token, direct logit change)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight_VD = getattr(output, "weight", None)
    n_directions = len(directions_LD)
    if n_tokens == 0 or weight_VD is None or weight_VD.shape[1] != directions_LD.shape[1]:
        return [([], []) for _ in range(n_directions)]
    with torch.inference_mode():
        lens_LD = logit_lens_directions(
            model, torch.from_numpy(np.asarray(directions_LD, dtype=np.float32))
        )
        lens_LD = lens_LD.to(weight_VD.device, weight_VD.dtype)
        effect_LV = (lens_LD @ weight_VD.T).float().cpu()
    n_tokens = min(n_tokens, effect_LV.shape[1])
    byte_level = _is_byte_level(tokenizer)
    result = []
    for effect_V in effect_LV:
        pairs = []
        for top in (effect_V.topk(n_tokens), effect_V.topk(n_tokens, largest=False)):
            ids = top.indices.tolist()
            texts = [token_texts(tokenizer, [i], byte_level=byte_level)[0] for i in ids]
            pairs.append(list(zip(texts, top.values.tolist(), strict=True)))
        result.append((pairs[0], pairs[1]))
    return result
