"""Top-activating examples of latents: one streaming pass over a corpus, then windows.

`top_activating_examples` reads a corpus in one streaming pass (then only the texts that
hold a reported example, for their windows) and reports, for each requested latent, the
tokens it fires most on (with their context), samples from lower activation
quantiles, its firing density and activation histogram, and the tokens its decoder
direction promotes and suppresses through the model's unembedding. Public through
`skSAE.interpret`; `skSAE.dashboard` builds on `collect_reports`, which can also read
an extraction already in memory instead of the extractor.

Shape suffixes::

    N rows of X (tokens, flattened)   B minibatch rows        S sequence positions
    D n_features (d_model, SAE input) F n_components (latents) L requested latents
    K kept examples per latent (top-k) R reservoir slots       V vocabulary
    C candidate rows of a batch (those that can enter a top-k or the reservoir)
"""

import sys
from numbers import Integral
from typing import NamedTuple

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ._estimator import check_input_width, inference_module
from ._sklearn_compat import HasMethods, Interval, validate_params
from ._utils import resolve_device
from ._validation import check_latents, invalid_parameter

__all__ = ["ActivatingExample", "LatentReport", "collect_reports", "top_activating_examples"]

# Bins of each latent's activation histogram (before trailing empty bins are trimmed).
_HISTOGRAM_BINS = 64
# Non-zero activations kept per latent, uniformly at random, for the quantile samples.
_RESERVOIR_SIZE = 64
# Activation quantile intervals sampled below the top examples, highest first.
_QUANTILE_EDGES = (1.0, 0.75, 0.5, 0.25, 0.0)
# Rows encoded at once when reading an extraction in memory: a default extractor batch
# (8 contexts of 128 tokens), so memory stays that of the extractor's own pass.
_CHUNK_ROWS = 1024


class ActivatingExample(NamedTuple):
    """One token on which a latent fires, with the text around it."""

    activation: float
    """The latent's value at the marked token."""
    doc_index: int
    """Index of the text the token comes from."""
    position: int
    """Index of the token within its text's tokens (as `Extraction.position`)."""
    tokens: list
    """Decoded tokens of a window around the marked token, from the same text only."""
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
    most through the unembedding; ``[]`` when the model has no language-model head."""
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
    the corpus size. The texts holding a reported example are then extracted a second
    time to read the latents' values on the tokens around it.

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
    Promoted and suppressed tokens are the "logit lens" of the decoder direction:
    ``W_U @ components_[latent]``, with ``W_U`` the model's output embedding. This is
    the direct effect of adding the direction to the residual stream on the logits,
    ignoring the final layer norm (Llama/SmolLM2, GPT-2) and every later block. It is
    most meaningful for ``hook="resid_post"``, ``"attn_out"`` and ``"mlp_out"``, whose
    outputs are added to the residual stream.

    Quantile samples come from a uniform random sample of up to 64 non-zero
    activations per latent (a bottom-k sketch of random keys), so their quantile
    intervals are estimates; the histogram counts are exact.

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
    )


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
    """`top_activating_examples` on checked arguments, optionally from an extraction.

    For package code (the dashboard). ``latents`` is a checked list of ints. When
    ``extraction`` (an `Extraction` of ``texts`` by ``extractor``) is given, its rows are
    read instead of running the model, both for the pass over the corpus and for the
    window tokens, so the model only runs for the logit effects' weights. The reports
    are those of the extractor's pass up to float rounding, except the histogram's bin
    edges, which depend on where the batches split the rows (the counts stay exact).
    """
    before, after = window
    rng = check_random_state(random_state)
    model, tokenizer = extractor.load()
    device = resolve_device(sae.device)
    module = inference_module(sae, device)
    latents_L = torch.tensor(latents, device=device)
    if extraction is None:
        batches = _extractor_batches(extractor, texts)
    else:
        batches = _extraction_batches(extraction)
    state = _RunningState(len(latents), k, _RESERVOIR_SIZE if n_quantile_samples else 0)
    progress = tqdm(disable=not verbose, file=sys.stdout, unit="tok", desc="top activations")
    try:
        with torch.inference_mode():
            for acts_ND, doc_N, position_N in batches:
                if len(acts_ND) == 0:
                    continue
                check_input_width(sae, acts_ND)
                x_ND = torch.from_numpy(acts_ND).to(device)
                codes_NL = module.encode(x_ND).index_select(1, latents_L).cpu()
                state.update(codes_NL, torch.from_numpy(doc_N), torch.from_numpy(position_N), rng)
                progress.update(len(acts_ND))
    finally:
        progress.close()
    if state.n_rows == 0:
        raise ValueError(
            "No token was kept: the texts are too short once special tokens and the first "
            "position of each context are dropped."
        )

    tops = state.top_examples()
    quantiles = state.quantile_examples(n_quantile_samples, rng, tops)
    needed = {}
    for column in range(len(latents)):
        for _, doc, position in tops[column] + [x for _, xs in quantiles[column] for x in xs]:
            needed.setdefault(doc, set()).update(range(position - before, position + after + 1))
    if extraction is None:
        window_codes = _window_codes(module, extractor, texts, needed, latents_L, device)
    else:
        window_codes = _window_codes_in(extraction, module, needed, latents_L, device)
    windows = _Windows(tokenizer, texts, window_codes, before, after)
    logits = _logit_effects(model, tokenizer, sae, latents, n_logit_tokens)

    reports = {}
    for column, latent in enumerate(latents):
        reports[latent] = LatentReport(
            latent=latent,
            density=float(state.fires_L[column]) / state.n_rows,
            max_activation=tops[column][0][0] if tops[column] else 0.0,
            top=[windows.example(column, *example) for example in tops[column]],
            quantiles=[
                (label, [windows.example(column, *example) for example in examples])
                for label, examples in quantiles[column]
            ],
            histogram=state.histogram(column),
            promoted=logits[column][0],
            suppressed=logits[column][1],
        )
    return reports


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


class _RunningState:
    """Per-latent running statistics over batches of codes (all on the CPU)."""

    def __init__(self, n_latents, k, reservoir_size):
        self.k = k
        self.reservoir_size = reservoir_size
        self.n_rows = 0
        self.fires_L = torch.zeros(n_latents, dtype=torch.int64)
        # Top-k: values and provenance, merged with each batch by torch.topk.
        self.top_KL = torch.empty(0, n_latents)
        self.top_doc_KL = torch.empty(0, n_latents, dtype=torch.int64)
        self.top_position_KL = torch.empty(0, n_latents, dtype=torch.int64)
        # Reservoir: the non-zero activations with the smallest random keys, a uniform
        # sample without replacement that merges batch by batch like the top-k.
        self.key_RL = torch.empty(0, n_latents, dtype=torch.float64)
        self.sample_RL = torch.empty(0, n_latents)
        self.sample_doc_RL = torch.empty(0, n_latents, dtype=torch.int64)
        self.sample_position_RL = torch.empty(0, n_latents, dtype=torch.int64)
        # Histogram over [0, upper_L] in equal bins; upper doubles (merging bin pairs)
        # whenever a larger activation arrives, so the counts stay exact.
        self.upper_L = torch.zeros(n_latents, dtype=torch.float64)
        self.counts_LH = torch.zeros(n_latents, _HISTOGRAM_BINS, dtype=torch.int64)

    def update(self, codes_NL, doc_N, position_N, rng):
        n_rows, n_latents = codes_NL.shape
        self.n_rows += n_rows
        fired_NL = codes_NL > 0
        self.fires_L += fired_NL.sum(dim=0)
        self.top_KL, self.top_doc_KL, self.top_position_KL = _merge_running(
            (self.top_KL, self.top_doc_KL, self.top_position_KL),
            codes_NL,
            doc_N,
            position_N,
            self.k,
            largest=True,
        )[:3]
        if self.reservoir_size:
            key_NL = torch.from_numpy(rng.random_sample((n_rows, n_latents)))
            key_NL.masked_fill_(~fired_NL, float("inf"))
            self.key_RL, self.sample_doc_RL, self.sample_position_RL, index_RL = _merge_running(
                (self.key_RL, self.sample_doc_RL, self.sample_position_RL),
                key_NL,
                doc_N,
                position_N,
                self.reservoir_size,
                largest=False,
            )
            n_old = self.sample_RL.shape[0]
            from_batch_RL = index_RL >= n_old
            batch_values_RL = codes_NL.gather(0, (index_RL - n_old).clamp_min(0))
            if n_old:
                old_values_RL = self.sample_RL.gather(0, index_RL.clamp_max(n_old - 1))
                self.sample_RL = torch.where(from_batch_RL, batch_values_RL, old_values_RL)
            else:
                self.sample_RL = batch_values_RL
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

    def top_examples(self):
        """Per latent: (activation, doc, position) of the top activations above 0."""
        return [
            [
                (float(value), int(doc), int(position))
                for value, doc, position in zip(
                    self.top_KL[:, column].tolist(),
                    self.top_doc_KL[:, column].tolist(),
                    self.top_position_KL[:, column].tolist(),
                    strict=True,
                )
                if value > 0
            ]
            for column in range(self.top_KL.shape[1])
        ]

    def quantile_examples(self, n_samples, rng, tops):
        """Per latent: (label, examples) for each quartile of the sampled activations."""
        result = []
        for column in range(self.fires_L.shape[0]):
            if n_samples == 0 or self.sample_RL.shape[0] == 0:
                result.append([])
                continue
            valid_R = torch.isfinite(self.key_RL[:, column])
            values_R = self.sample_RL[valid_R, column].numpy()
            docs_R = self.sample_doc_RL[valid_R, column].numpy()
            positions_R = self.sample_position_RL[valid_R, column].numpy()
            if len(values_R) == 0:
                result.append([])
                continue
            # The top examples are shown already; sample the rest of each interval.
            in_top = {(doc, position) for _, doc, position in tops[column]}
            fresh_R = np.array(
                [(d, p) not in in_top for d, p in zip(docs_R, positions_R, strict=True)],
                dtype=bool,
            )
            cuts = np.quantile(values_R, _QUANTILE_EDGES)
            intervals = []
            for i, (high, low) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
                inside = (values_R >= low) & ((values_R < high) if i else (values_R <= high))
                inside &= fresh_R
                candidates = np.flatnonzero(inside)
                chosen = rng.permutation(candidates)[:n_samples]
                chosen = chosen[np.argsort(-values_R[chosen], kind="stable")]
                label = f"{round(100 * _QUANTILE_EDGES[i + 1])}-{round(100 * _QUANTILE_EDGES[i])}%"
                examples = [
                    (float(values_R[j]), int(docs_R[j]), int(positions_R[j])) for j in chosen
                ]
                intervals.append((label, examples))
            result.append(intervals)
        return result


def _merge_running(kept, scores_NL, doc_N, position_N, n_keep, *, largest):
    """Merge a batch into per-latent (score, doc, position) arrays of at most ``n_keep`` rows.

    ``kept`` holds (scores, docs, positions) of shape (K, L). Returns the merged three and
    the index of each kept row in ``cat([kept scores, scores_NL])``. The batch's docs and
    positions are looked up by index, never expanded to (N, L).
    """
    scores_KL, doc_KL, position_KL = kept
    n_old = scores_KL.shape[0]
    if largest and n_old == n_keep:
        # Only rows above some latent's current k-th value can enter: after the first
        # batches, a small part of each batch.
        rows = torch.nonzero((scores_NL > scores_KL[-1]).any(dim=1)).flatten()
        if len(rows) == 0:
            return scores_KL, doc_KL, position_KL, torch.arange(n_old)[:, None].expand_as(doc_KL)
        scores_NL, doc_N, position_N = scores_NL[rows], doc_N[rows], position_N[rows]
    else:
        rows = None
    all_KL = torch.cat([scores_KL, scores_NL])
    merged_KL, index_KL = all_KL.topk(min(n_keep, all_KL.shape[0]), dim=0, largest=largest)
    from_batch_KL = index_KL >= n_old
    batch_index_KL = (index_KL - n_old).clamp_min(0)
    new_doc_KL = doc_N[batch_index_KL] if len(doc_N) else torch.zeros_like(index_KL)
    new_position_KL = position_N[batch_index_KL] if len(doc_N) else torch.zeros_like(index_KL)
    if n_old:
        old_index_KL = index_KL.clamp_max(n_old - 1)
        new_doc_KL = torch.where(from_batch_KL, new_doc_KL, doc_KL.gather(0, old_index_KL))
        new_position_KL = torch.where(
            from_batch_KL, new_position_KL, position_KL.gather(0, old_index_KL)
        )
    if rows is not None:  # back to the batch's own row numbers
        index_KL = torch.where(from_batch_KL, rows[batch_index_KL] + n_old, index_KL)
    return merged_KL, new_doc_KL, new_position_KL, index_KL


def _window_codes(module, extractor, texts, needed, latents_L, device):
    """{(doc, position): codes of the requested latents} at the window tokens.

    Reads again only the texts in ``needed`` (``{doc: positions}``).
    """
    docs = sorted(needed)
    if not docs:
        return {}
    found = {}
    with torch.inference_mode():
        for acts_ND, doc_N, position_N in _extractor_batches(extractor, [texts[d] for d in docs]):
            rows = [
                row
                for row, (doc, position) in enumerate(zip(doc_N, position_N, strict=True))
                if position in needed[docs[doc]]
            ]
            if not rows:
                continue
            x_ND = torch.from_numpy(acts_ND[rows]).to(device)
            codes_NL = module.encode(x_ND).index_select(1, latents_L).cpu().numpy()
            for row, codes_L in zip(rows, codes_NL, strict=True):
                found[(docs[int(doc_N[row])], int(position_N[row]))] = codes_L
    return found


def _window_codes_in(extraction, module, needed, latents_L, device):
    """The same, from the rows of an extraction of the whole corpus."""
    if not needed or len(extraction.position) == 0:
        return {}
    # One int64 key per (doc, position); window positions outside a text's rows drop out.
    span = int(extraction.position.max()) + 1
    wanted = [
        doc * span + p for doc, positions in needed.items() for p in positions if 0 <= p < span
    ]
    key_N = extraction.doc_index.astype(np.int64) * span + extraction.position
    rows = np.flatnonzero(np.isin(key_N, np.array(wanted, dtype=np.int64)))
    found = {}
    with torch.inference_mode():
        for start in range(0, len(rows), _CHUNK_ROWS):
            chunk = rows[start : start + _CHUNK_ROWS]
            x_ND = torch.from_numpy(extraction.activations[chunk]).to(device)
            codes_NL = module.encode(x_ND).index_select(1, latents_L).cpu().numpy()
            for row, codes_L in zip(chunk, codes_NL, strict=True):
                found[(int(extraction.doc_index[row]), int(extraction.position[row]))] = codes_L
    return found


class _Windows:
    """Builds `ActivatingExample`s: tokens around a position, decoded once per text."""

    def __init__(self, tokenizer, texts, window_codes, before, after):
        self.tokenizer = tokenizer
        self.texts = texts
        self.window_codes = window_codes
        self.before = before
        self.after = after
        self._ids = {}

    def example(self, column, activation, doc, position):
        if doc not in self._ids:
            self._ids[doc] = self.tokenizer(self.texts[doc], add_special_tokens=False)["input_ids"]
        ids = self._ids[doc]
        start = max(0, position - self.before)
        stop = min(len(ids), position + self.after + 1)
        token_activations = []
        for p in range(start, stop):
            codes_L = self.window_codes.get((doc, p))
            token_activations.append(0.0 if codes_L is None else float(codes_L[column]))
        return ActivatingExample(
            activation=activation,
            doc_index=doc,
            position=position,
            tokens=_decode_tokens(self.tokenizer, ids[start:stop]),
            token_activations=token_activations,
            marked=position - start,
        )


def _decode_tokens(tokenizer, ids):
    """Each token's text, as it reads inside the window (spaces and bytes joined right).

    Token ``i`` is the text ``decode(ids[:i + 1])`` adds to ``decode(ids[:i])``, which
    keeps the leading spaces that SentencePiece drops from lone tokens and shows
    multi-byte characters on the token that completes them.
    """
    tokens = []
    previous = ""
    for i in range(len(ids)):
        current = tokenizer.decode(ids[: i + 1])
        if current.startswith(previous):
            tokens.append(current[len(previous) :])
        else:
            tokens.append(tokenizer.decode(ids[i : i + 1]))
        previous = current
    return tokens


def _logit_effects(model, tokenizer, sae, latents, n_tokens):
    """Per latent: (promoted, suppressed) lists of (token, direct logit change)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight_VD = getattr(output, "weight", None)
    if n_tokens == 0 or weight_VD is None or weight_VD.shape[1] != sae.components_.shape[1]:
        return [([], []) for _ in latents]
    with torch.inference_mode():
        directions_LD = torch.from_numpy(sae.components_[latents]).to(weight_VD.device)
        effect_LV = (directions_LD.to(weight_VD.dtype) @ weight_VD.T).float().cpu()
    n_tokens = min(n_tokens, effect_LV.shape[1])
    result = []
    for effect_V in effect_LV:
        high = effect_V.topk(n_tokens)
        low = effect_V.topk(n_tokens, largest=False)
        result.append(
            (
                [(_token_text(tokenizer, i), v) for v, i in zip(*_lists(high), strict=True)],
                [(_token_text(tokenizer, i), v) for v, i in zip(*_lists(low), strict=True)],
            )
        )
    return result


def _lists(topk):
    return topk.values.tolist(), topk.indices.tolist()


def _token_text(tokenizer, token_id):
    text = tokenizer.decode([token_id])
    return text if text else f"<{token_id}>"
