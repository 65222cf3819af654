"""Feature absorption on the first-letter task (Chanin et al. 2024; SAEBench's definitions).

`first_letter_absorption` asks a model for the first letter of single-token words with an
in-context-learning prompt, trains a linear probe per letter on the activations at the
word's token, finds each letter's main SAE latents by k-sparse probing, and measures how
often the main latents stay silent while other latents aligned with the probe carry the
letter ("absorption"). The definitions, thresholds and aggregation follow SAEBench's
``sae_bench/evals/absorption`` (Karvonen et al. 2025); the module docstring of each step
names the file it follows and where this one differs. Public through `skSAE.evaluation`.

Shape suffixes (NumPy arrays)::

    N words (one activation each)   D n_features (d_model, SAE input)
    F n_components (latents)        K latents of a k-sparse probe
"""

import statistics
import sys
import time
import warnings
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._estimator import check_input_width
from ._sklearn_compat import HasMethods, Interval, l1_logistic_regression, validate_params

__all__ = ["FewLettersWarning", "FirstLetterAbsorption", "first_letter_absorption"]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# SAEBench eval_config.py: prompt_template; the answer is " " + the capitalised letter
# (prompting.py, first_letter_formatter) and ICL lines are joined by "\n".
PROMPT_TEMPLATE = "{word} has the first letter:"
# SAEBench probing.py, create_dataset_probe_training: train_test_fraction.
TRAIN_FRACTION = 0.8
# SAEBench probing.py, train_linear_probe_for_task: Adam's weight_decay (an L2 penalty),
# applied to each of its 26 jointly trained letter probes, whose BCE is averaged over
# the 26 (train_multi_probe's BCEWithLogitsLoss), so each probe's L2 is 26 times heavier.
PROBE_L2 = 1e-4
N_PROBES = len(LETTERS)
# SAEBench eval_config.py: k_sparse_probe_l1_decay.
K_SPARSE_L1 = 0.01
# SAEBench feature_absorption_calculator.py, FeatureAbsorptionCalculator fields.
ABSORPTION_FRACTION_COS_THRESHOLD = 0.1
FULL_ABSORPTION_COS_THRESHOLD = 0.025
PROJECTION_PROPORTION_THRESHOLD = 0.4
MAX_ABSORBING_LATENTS = 3
EPS = 1e-8
# SAEBench eval_config.py: min_GT_probe_f1 and min_feats_for_eval (its runner's guard).
MIN_PROBE_F1 = 0.6
MIN_LETTERS = 20


class FewLettersWarning(UserWarning):
    """Fewer letters than SAEBench requires have a probe good enough to measure absorption."""


class FirstLetterAbsorption(NamedTuple):
    """The scores of `first_letter_absorption` and its per-letter table."""

    scores: dict
    """Flat dict of floats and ints: the means over letters and the counts behind them."""
    letters: list
    """One dict per letter evaluated (alphabetical order)."""


@validate_params(
    {
        "sae": [HasMethods(["transform", "inverse_transform"])],
        "extractor": [HasMethods(["activations_at", "load"])],
        "words": ["array-like", None],
        "max_words": [Interval(Integral, 2, None, closed="left")],
        "min_length": [Interval(Integral, 1, None, closed="left")],
        "n_icl_examples": [Interval(Integral, 1, None, closed="left")],
        "max_k": [Interval(Integral, 1, None, closed="left")],
        "f1_jump_threshold": [Interval(Real, 0, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    },
    prefer_skip_nested_validation=True,
)
def first_letter_absorption(
    sae,
    extractor,
    *,
    words=None,
    max_words=3000,
    min_length=2,
    n_icl_examples=10,
    max_k=10,
    f1_jump_threshold=0.03,
    random_state=0,
    verbose=0,
):
    """Feature absorption and feature splitting of an SAE on the first-letter task.

    Follows SAEBench's absorption eval (Karvonen et al. 2025), itself the metric of
    Chanin et al. (2024):

    1. **Words**: single-token words of the tokenizer (see `words`), shuffled and split
       80/20 into train and test words.
    2. **Prompts**: ``"{word} has the first letter:"`` after `n_icl_examples` solved
       examples (``" cat has the first letter: C"``, one per line) drawn from the same
       split; the activation is read at the word's token at ``extractor``'s hook.
    3. **Probe**: one logistic-regression probe per letter (one-vs-rest, the positive
       class weighted by negatives / positives) on the train words' activations.
    4. **Main latents**: an L1-penalised probe per letter on the train words' SAE codes
       ranks the latents; a k-sparse probe (logistic regression on the top k latents) is
       fitted for k = 1 .. `max_k`, and the main latents are those of the last k whose
       test F1 beat the previous best by more than `f1_jump_threshold` (the first k
       that does not ends the search). Their number is the letter's split count.
    5. **Absorption**, on the test words of each letter that its probe classifies
       correctly (the probe's true positives), with ``p`` the unit probe direction,
       ``a`` the activation, ``c`` the codes and ``cos`` the cosine of each decoder row
       with ``p``: the probe projection is ``a . p``, each latent's share of it
       ``c_f * cos_f``. The *absorption fraction* is 0 when the main latents' share
       reaches the probe projection, or when the (at most 3) other positive shares of
       latents with ``cos >= 0.1`` sum to less than 0.4 of it; 1 when the main latents'
       share is <= 0; else ``A / (A + M)`` with ``M`` the main share and ``A`` the
       smaller of the absorbers' sum and the unexplained projection. *Full absorption*:
       every main latent is silent (< 1e-8), the latent with the largest share has
       ``cos >= 0.025`` and carries at least 0.4 of a non-negative probe projection.

    The scores are means over the letters with at least one probe true positive of the
    per-letter mean absorption fraction, full-absorption rate and split count.

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted on activations of ``extractor``'s hook.
    extractor : ActivationExtractor
        The model and hook point. Its rules apply: a word whose token it drops (e.g. by
        `max_norm_ratio`) is left out. Each prompt must fit in one context
        (`context_size`; about 90 tokens for SmolLM2 with 10 examples).
    words : list of str, default=None
        Candidate words. None takes the tokenizer's vocabulary: every token that decodes
        to ASCII letters (with a leading space, for SmolLM2's and GPT-2's byte-level
        BPE) that a space followed by those letters encodes to. Given words are
        stripped and kept under the same rule (a word that is not one token after a
        space is left out). Words with fewer than `min_length` letters are left out
        either way.
    max_words : int, default=3000
        At most this many words (a random sample); bounds the time (one prompt of
        about 90 tokens per word) and memory (one activation per word).
    min_length : int, default=2
        Fewest letters in a word.
    n_icl_examples : int, default=10
        Solved examples before each word (fewer when a split has fewer other words).
    max_k : int, default=10
        Largest k of the k-sparse probes.
    f1_jump_threshold : float, default=0.03
        F1 gain that counts as a split (another latent added to the main latents).
    random_state : int, RandomState instance or None, default=0
        Word sample, split and ICL examples.
    verbose : int or bool, default=0
        Progress of each stage (stdout).

    Returns
    -------
    result : FirstLetterAbsorption
        ``scores``: ``mean_absorption_fraction_score``, ``mean_full_absorption_score``,
        ``mean_num_split_features`` (SAEBench's means) and their ``std_dev_*`` (sample
        standard deviations over letters; NaN with one letter), ``mean_probe_f1``
        (test F1 of the letter probes), ``n_letters`` (letters scored),
        ``n_letters_probe_f1_above_0.6``, ``n_words`` (words with an activation),
        ``n_train_words``, ``n_test_words``, ``n_probe_true_positives``,
        ``n_words_dropped`` (candidates whose prompt did not keep the word as one token
        or whose row the extractor dropped). ``letters``: for each letter with a train
        and a test word, ``letter``, ``n_train_words``, ``n_test_words``, ``probe_f1``,
        ``main_latents`` (list of int), ``num_split_features``, ``k_sparse_f1`` (test
        F1 for k = 1 .. `max_k`), ``n_probe_true_positives``,
        ``mean_absorption_fraction`` and ``full_absorption_rate`` (NaN without a true
        positive), ``num_full_absorption`` and ``full_absorption_words``.

    Raises
    ------
    ValueError
        If no word is usable (none is one token after a space, or too few for a
        split), a prompt does not fit in one context, or the SAE was fitted on another
        width than the hook's.

    Warns
    -----
    FewLettersWarning
        When fewer than 20 letters have a probe test F1 above 0.6: SAEBench's runner
        then reports no absorption for the model (small models may not know spelling
        at that layer). The scores are returned anyway.

    See Also
    --------
    skSAE.metrics.loss_recovered : Fidelity of the SAE inside the model.

    Notes
    -----
    Where this differs from SAEBench (``sae_bench/evals/absorption``):

    - Words (``vocab.py``, ``get_alpha_tokens``): SAEBench keeps every alphabetic token
      with or without a leading space, of any length, and the whole vocabulary; here
      the word must carry the leading space (so it stays one token inside the prompt),
      have `min_length` letters, and at most `max_words` are sampled.
    - Probes (``probing.py``, ``k_sparse_probing.py``): SAEBench trains them with Adam
      for 50 epochs of batches of 4096 words; here scikit-learn finds the minimiser of
      the same objective (mean BCE with ``pos_weight`` over samples and the 26 probes;
      Adam's weight decay 1e-4 for the letter probes, an L1 penalty of 0.01 for the
      ranking probe). With a few thousand words those 50 epochs are 50 steps, too few:
      replayed on SmolLM2 (2,400 train words), the Adam ranking probe's top latent gave
      a 1-sparse probe a test F1 of at most 0.15 for every letter, while the optimum's
      top latent is, for 15 of 23 letters, the one whose firing best matches the
      letter's train words (F1). The optimum is exactly sparse; latents with a zero
      weight (past the 13 to 86 non-zero ones per letter there) are ranked by their
      mean code on the letter's words minus on the others.
    - Absorption (``feature_absorption_calculator.py``): SAEBench prompts the test words
      again with new examples from the whole vocabulary; here the test prompt's
      activation is reused. The word's position is found by tokenising the prompt
      (SAEBench's fixed index -6 for the same template).
    - SAEBench's guard (at least 20 letters with probe F1 > 0.6) warns instead of
      returning nothing.

    On SmolLM2-135M-Instruct at block 6 (`skSAE.corpora.smollm2_path`), with a TopK SAE
    (``k=32``, 4608 latents, ``max_iter=2`` on 112,104 tokens) and the defaults: 3000
    words (2400 train, 600 test), 23 letters scored, mean probe F1 0.80 (22 letters
    above 0.6), mean absorption fraction 0.65, mean full absorption 0.23 and 1.35 main
    latents per letter, in 148 s of CPU time on one thread (model load included; 452 s
    of wall time on a shared 2-core machine), nearly all of it the forward pass over
    the 3000 prompts (about 87 tokens each); peak memory 1.0 GB.

    References
    ----------
    Chanin, D., Wilken-Smith, J., Dulka, T., Bhatnagar, H. and Bloom, J. (2024). A is
    for Absorption: Studying feature splitting and absorption in sparse autoencoders.
    arXiv:2409.14507.

    Karvonen, A. et al. (2025). SAEBench: A comprehensive benchmark for sparse
    autoencoders in language model interpretability. arXiv:2503.09532.

    Examples
    --------
    >>> from skSAE.evaluation import first_letter_absorption  # doctest: +SKIP
    >>> scores, letters = first_letter_absorption(sae, extractor)  # doctest: +SKIP
    >>> sorted(scores)[:2]  # doctest: +SKIP
    ['mean_absorption_fraction_score', 'mean_full_absorption_score']
    """
    check_is_fitted(sae)
    rng = check_random_state(random_state)
    started = time.perf_counter()
    _, tokenizer = extractor.load()
    candidates = single_token_words(tokenizer, words, min_length)
    if len(candidates) > max_words:
        candidates = [candidates[i] for i in sorted(rng.choice(len(candidates), max_words, False))]
    if len(candidates) < 2:
        raise ValueError(
            f"No usable words: {len(candidates)} word(s) are one token after a space with "
            f"at least min_length={min_length} letters; need 2 (a train and a test word)."
        )
    order = rng.permutation(len(candidates))
    n_train = min(max(int(len(candidates) * TRAIN_FRACTION), 1), len(candidates) - 1)
    splits = (
        [candidates[i] for i in order[:n_train]],
        [candidates[i] for i in order[n_train:]],
    )
    texts, positions, kept, is_train = [], [], [], []
    for train, split in zip((True, False), splits, strict=True):
        prompts = build_prompts(tokenizer, split, n_icl_examples, rng)
        for (word, _), prompt in zip(split, prompts, strict=True):
            if prompt is not None:
                texts.append(prompt[0])
                positions.append(prompt[1])
                kept.append(word)
                is_train.append(train)
    _check_context(extractor, tokenizer, texts)
    _say(verbose, started, f"{len(texts)} prompts of {len(candidates)} words")
    X_ND, found_N = word_activations(sae, extractor, texts, np.asarray(positions))
    _say(verbose, started, f"{int(found_N.sum())} activations")
    kept = [w for w, found in zip(kept, found_N, strict=True) if found]
    is_train_N = np.asarray(is_train, dtype=bool)[found_N]
    labels_N = np.array([LETTERS.index(w.strip()[0].lower()) for w in kept], dtype=np.int64)
    if not is_train_N.any() or is_train_N.all():
        raise ValueError(
            f"No usable words: {len(kept)} word(s) have an activation, not enough for a "
            "train and a test split."
        )
    codes_NF = sae.transform(X_ND)
    codes_NF = np.asarray(
        codes_NF.toarray() if sparse.issparse(codes_NF) else codes_NF, dtype=np.float32
    )
    table = score_letters(
        X_ND[is_train_N],
        labels_N[is_train_N],
        codes_NF[is_train_N],
        X_ND[~is_train_N],
        labels_N[~is_train_N],
        codes_NF[~is_train_N],
        np.asarray(sae.components_),
        words=[w for w, train in zip(kept, is_train_N, strict=True) if not train],
        max_k=max_k,
        f1_jump_threshold=f1_jump_threshold,
    )
    _say(verbose, started, f"{len(table)} letters scored")
    scores = summarise(table)
    scores.update(
        n_words=len(kept),
        n_train_words=int(is_train_N.sum()),
        n_test_words=int((~is_train_N).sum()),
        n_words_dropped=len(candidates) - len(kept),
    )
    if scores[f"n_letters_probe_f1_above_{MIN_PROBE_F1}"] < MIN_LETTERS:
        warnings.warn(
            f"{scores[f'n_letters_probe_f1_above_{MIN_PROBE_F1}']} letters have a probe "
            f"test F1 above {MIN_PROBE_F1}; SAEBench needs {MIN_LETTERS} to report "
            "absorption (the model may not represent first letters at this hook).",
            FewLettersWarning,
            stacklevel=2,
        )
    return FirstLetterAbsorption(scores, table)


def _say(verbose, started, message):
    if verbose:
        print(f"[first_letter_absorption] {time.perf_counter() - started:6.1f}s {message}")
        sys.stdout.flush()


# ------------------------------------------------------------------ words and prompts


def single_token_words(tokenizer, words, min_length):
    """(``" " + word``, token id) for the words that are one token after a space.

    ``words=None`` scans the vocabulary for tokens that decode to ASCII letters (around
    whitespace) and that a space and those letters encode back to. SAEBench's
    ``vocab.py`` (``get_alpha_tokens``) keeps alphabetic tokens with or without the
    space; the space is required here so the word stays one token after the prompt's
    newline.
    """
    if words is None:
        ids = sorted(set(tokenizer.get_vocab().values()))
        decoded = tokenizer.batch_decode([[i] for i in ids])
        # The stripped text must encode back to this token after a space (below).
        pairs = [(" " + text.strip(), i) for text, i in zip(decoded, ids, strict=True)]
    else:
        pairs = [(" " + str(word).strip(), None) for word in words]
    pairs = [
        (text, i)
        for text, i in pairs
        if len(text) > min_length and text[1:].isascii() and text[1:].isalpha()
    ]
    if not pairs:
        return []
    encoded = tokenizer([text for text, _ in pairs], add_special_tokens=False)["input_ids"]
    found, seen = [], set()
    for (text, i), ids in zip(pairs, encoded, strict=True):
        if len(ids) == 1 and (i is None or ids[0] == i) and text not in seen:
            seen.add(text)
            found.append((text, ids[0]))
    return found


def build_prompts(tokenizer, split, n_icl_examples, rng):
    """For each (word, token id): (prompt, position of the word's token), or None.

    The examples are drawn from the other words of the same split, as SAEBench's
    ``probing.py`` (``create_dataset_probe_training``) does. None when the prompt's
    tokens do not hold the word as the token after the examples.
    """
    n_examples = min(n_icl_examples, len(split) - 1)
    prefixes, texts = [], []
    for index, (word, _) in enumerate(split):
        others = rng.choice(len(split) - 1, n_examples, replace=False) if n_examples else []
        examples = [split[j + (j >= index)][0] for j in others]
        lines = [PROMPT_TEMPLATE.format(word=ex) + " " + ex.strip()[0].upper() for ex in examples]
        prefix = "".join(line + "\n" for line in lines)
        prefixes.append(prefix)
        texts.append(prefix + PROMPT_TEMPLATE.format(word=word))
    if not texts:
        return []
    prefix_ids = tokenizer(prefixes, add_special_tokens=False)["input_ids"] if n_examples else None
    text_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompts = []
    for index, ((_, token), ids) in enumerate(zip(split, text_ids, strict=True)):
        head = prefix_ids[index] if prefix_ids is not None else []
        at = len(head)
        ok = at < len(ids) and ids[:at] == head and ids[at] == token
        prompts.append((texts[index], at) if ok else None)
    return prompts


def _check_context(extractor, tokenizer, texts):
    n_special = len(tokenizer("a")["input_ids"]) - len(
        tokenizer("a", add_special_tokens=False)["input_ids"]
    )
    if not texts:
        return
    longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    if longest + n_special > extractor.context_size:
        raise ValueError(
            f"A prompt has {longest + n_special} tokens but the extractor's "
            f"context_size={extractor.context_size}: set a larger context_size or a "
            "smaller n_icl_examples."
        )


def word_activations(sae, extractor, texts, positions):
    """The activation at ``positions[i]`` of ``texts[i]``, for each text the extractor keeps.

    `ActivationExtractor.activations_at`, cached when the extractor has a ``memory``
    (the prompts are the same for every SAE of one model and hook).

    Returns
    -------
    X_ND : ndarray of shape (n_found, n_features), float32
        In text order.
    found_N : ndarray of shape (n_texts,), bool
        Whether the text's word token has a row (the extractor may drop it).
    """
    X_ND, found_N = extractor.activations_at(texts, positions)
    if not found_N.any():
        return np.zeros((0, sae.n_features_in_), dtype=np.float32), found_N
    check_input_width(sae, X_ND)
    return X_ND, found_N


# ------------------------------------------------------------------ probes and scores


def _balance_weights(y):
    """SAEBench's BCE ``pos_weight`` (negatives / positives) as sample weights."""
    n_pos = int(y.sum())
    return np.where(y, (len(y) - n_pos) / max(n_pos, 1), 1.0)


def fit_probe(X_ND, y_N):
    """Letter probe: (weight_D, bias) of a logistic regression, letter vs the rest.

    The minimiser of SAEBench's probe loss (``probing.py``, ``train_multi_probe``: mean
    BCE with ``pos_weight``, averaged over samples and its 26 probes, plus Adam's weight
    decay 1e-4, i.e. ``1e-4 / 2 * |w|^2`` per probe).
    """
    X = np.asarray(X_ND, dtype=np.float64)
    probe = LogisticRegression(C=1.0 / (N_PROBES * PROBE_L2 * len(y_N)), max_iter=2000)
    probe.fit(X, y_N, sample_weight=_balance_weights(y_N))
    return probe.coef_[0], float(probe.intercept_[0])


def rank_latents(codes_NF, y_N, n_latents):
    """The ``n_latents`` latents that best predict the letter, best first.

    SAEBench's ``k_sparse_probing.py`` (``train_k_sparse_probes``) ranks by the weights
    of an L1-penalised probe on the codes (``topk`` of the weight, not its absolute
    value); the exact L1 optimum leaves many weights at 0, ranked here by the mean
    code on the letter's words minus that on the others.
    """
    n_latents = min(n_latents, codes_NF.shape[1])
    diff_F = codes_NF[y_N].mean(axis=0) - codes_NF[~y_N].mean(axis=0)
    weight_F = np.zeros(codes_NF.shape[1])
    if codes_NF.any():
        probe = l1_logistic_regression(
            C=1.0 / (K_SPARSE_L1 * len(y_N)), solver="liblinear", max_iter=1000
        )
        probe.fit(sparse.csr_matrix(codes_NF), y_N, sample_weight=_balance_weights(y_N))
        weight_F = probe.coef_[0]
    return np.lexsort((-diff_F, -weight_F))[:n_latents]


def split_features(codes_train_NF, y_train_N, codes_test_NF, y_test_N, max_k, f1_jump_threshold):
    """Main latents of a letter and the test F1 of its k-sparse probes, k = 1 .. max_k.

    SAEBench's ``k_sparse_probing.py``: a balanced logistic regression on the top k
    latents for each k (``train_k_sparse_probes``), and the main latents are those of
    the last k whose F1 beat the best so far by more than the threshold
    (``add_feature_splits_to_metrics_df``).
    """
    ranked = rank_latents(codes_train_NF, y_train_N, max_k)
    f1s, main, best = [], [], -np.inf
    for k in range(1, len(ranked) + 1):
        latents_K = ranked[:k]
        train_NK = codes_train_NF[:, latents_K]
        if train_NK.any():
            probe = LogisticRegression(max_iter=500, class_weight="balanced")
            scores_N = probe.fit(train_NK, y_train_N).decision_function(codes_test_NF[:, latents_K])
        else:
            scores_N = np.zeros(len(y_test_N))
        f1s.append(float(f1_score(y_test_N, scores_N > 0, zero_division=0.0)))
    for k, f1 in enumerate(f1s, start=1):
        if f1 <= best + f1_jump_threshold:
            break
        best, main = f1, [int(i) for i in ranked[:k]]
    return main, f1s


def probe_projections(X_ND, codes_NF, probe_D, decoder_FD):
    """Projections on the unit probe direction ``p``: of the activations, and per latent.

    SAEBench's ``feature_absorption_calculator.py``: the activation's projection
    ``a . p``, and each latent's share ``c_f * cos(W_dec[f], p)``. A decoder row of norm
    0 has cosine 0.

    Returns
    -------
    projection_N : ndarray of shape (n_words,), float64
    share_NF : ndarray of shape (n_words, n_components), float64
    cos_F : ndarray of shape (n_components,), float64
    """
    p_D = np.asarray(probe_D, dtype=np.float64)
    p_D = p_D / np.linalg.norm(p_D)
    decoder_FD = np.asarray(decoder_FD, dtype=np.float64)
    norm_F = np.linalg.norm(decoder_FD, axis=1)
    cos_F = np.divide(decoder_FD @ p_D, norm_F, out=np.zeros(len(norm_F)), where=norm_F > 0)
    share_NF = np.asarray(codes_NF, dtype=np.float64) * cos_F
    return np.asarray(X_ND, dtype=np.float64) @ p_D, share_NF, cos_F


def absorption_scores(X_ND, codes_NF, probe_D, decoder_FD, main_latents):
    """SAEBench's absorption fraction and full-absorption flag of each word.

    ``feature_absorption_calculator.py`` (``calculate_absorption`` and
    ``_is_full_absorption``); see `first_letter_absorption` for the definitions. A
    probe projection <= 0 gives a fraction of 0 (SAEBench divides by it).

    Returns
    -------
    fraction_N : ndarray of shape (n_words,), float64
    full_N : ndarray of shape (n_words,), bool
    """
    projection_N, share_NF, cos_F = probe_projections(X_ND, codes_NF, probe_D, decoder_FD)
    codes_NF = np.asarray(codes_NF, dtype=np.float64)
    main = np.asarray(main_latents, dtype=np.int64)
    main_N = share_NF[:, main].sum(axis=1)
    candidate_F = cos_F >= ABSORPTION_FRACTION_COS_THRESHOLD
    candidate_F[main] = False
    absorbers_NF = np.where(candidate_F & (share_NF > 0), share_NF, 0.0)
    n_top = min(MAX_ABSORBING_LATENTS, absorbers_NF.shape[1])
    top_N = -np.sort(-absorbers_NF, axis=1)[:, :n_top].sum(axis=1)
    fraction_N = np.zeros(len(projection_N))
    for n, (total, m, absorbed) in enumerate(zip(projection_N, main_N, top_N, strict=True)):
        if total <= 0 or m >= total or absorbed / total < PROJECTION_PROPORTION_THRESHOLD:
            continue
        if m <= 0:
            fraction_N[n] = 1.0
        else:
            a = min(absorbed, total - m)
            fraction_N[n] = min(max(a / (a + m), 0.0), 1.0)
    top_latent_N = share_NF.argmax(axis=1)
    top_share_N = share_NF[np.arange(len(share_NF)), top_latent_N]
    silent_N = (codes_NF[:, main] < EPS).all(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        carried_N = top_share_N / projection_N >= PROJECTION_PROPORTION_THRESHOLD
    full_N = (
        silent_N
        & (cos_F[top_latent_N] >= FULL_ABSORPTION_COS_THRESHOLD)
        & (projection_N >= 0)
        & carried_N
    )
    return fraction_N, full_N


def score_letters(
    X_train_ND,
    y_train_N,
    codes_train_NF,
    X_test_ND,
    y_test_N,
    codes_test_NF,
    decoder_FD,
    *,
    words,
    max_k,
    f1_jump_threshold,
):
    """The per-letter table, for the letters with a train and a test word.

    ``y_*_N`` hold letter indices (0 for "a"); ``words`` are the test words.
    """
    table = []
    for letter_index, letter in enumerate(LETTERS):
        train_N, test_N = y_train_N == letter_index, y_test_N == letter_index
        if not train_N.any() or not test_N.any() or train_N.all():
            continue
        probe_D, bias = fit_probe(X_train_ND, train_N)
        probe_scores_N = np.asarray(X_test_ND, dtype=np.float64) @ probe_D + bias
        main, f1s = split_features(
            codes_train_NF, train_N, codes_test_NF, test_N, max_k, f1_jump_threshold
        )
        positive_N = test_N & (probe_scores_N > 0)
        fraction_N, full_N = absorption_scores(
            X_test_ND[positive_N], codes_test_NF[positive_N], probe_D, decoder_FD, main
        )
        n_positive = int(positive_N.sum())
        positive_words = [word for word, hit in zip(words, positive_N, strict=True) if hit]
        table.append(
            {
                "letter": letter,
                "n_train_words": int(train_N.sum()),
                "n_test_words": int(test_N.sum()),
                "probe_f1": float(f1_score(test_N, probe_scores_N > 0, zero_division=0.0)),
                "main_latents": main,
                "num_split_features": len(main),
                "k_sparse_f1": f1s,
                "n_probe_true_positives": n_positive,
                "mean_absorption_fraction": (
                    float(fraction_N.mean()) if n_positive else float("nan")
                ),
                "full_absorption_rate": float(full_N.mean()) if n_positive else float("nan"),
                "num_full_absorption": int(full_N.sum()),
                "full_absorption_words": [
                    word for word, full in zip(positive_words, full_N, strict=True) if full
                ],
            }
        )
    return table


def summarise(table):
    """SAEBench's means (``main.py``, ``_aggregate_results_df`` and ``run_eval``).

    Over the letters with at least one probe true positive, as SAEBench's group-by over
    the true positives' rows.
    """
    scored = [row for row in table if row["n_probe_true_positives"]]
    columns = {
        "absorption_fraction_score": "mean_absorption_fraction",
        "full_absorption_score": "full_absorption_rate",
        "num_split_features": "num_split_features",
    }
    scores = {}
    for name, column in columns.items():
        values = [float(row[column]) for row in scored]
        scores[f"mean_{name}"] = statistics.mean(values) if values else float("nan")
        scores[f"std_dev_{name}"] = statistics.stdev(values) if len(values) > 1 else float("nan")
    probe_f1s = [row["probe_f1"] for row in table]
    scores["mean_probe_f1"] = statistics.mean(probe_f1s) if probe_f1s else float("nan")
    scores["n_letters"] = len(scored)
    scores[f"n_letters_probe_f1_above_{MIN_PROBE_F1}"] = sum(f1 > MIN_PROBE_F1 for f1 in probe_f1s)
    scores["n_probe_true_positives"] = sum(row["n_probe_true_positives"] for row in table)
    return scores
