"""Tests for skSAE._absorption (first-letter feature absorption, SAEBench's definitions)."""

import math
import warnings

import numpy as np
import pytest
import torch

from skSAE import ActivationExtractor, SparseAutoencoder
from skSAE._absorption import (
    LETTERS,
    FewLettersWarning,
    absorption_scores,
    first_letter_absorption,
    fit_probe,
    probe_projections,
    score_letters,
    single_token_words,
    split_features,
    summarise,
)

# ----------------------------------------------------------- float64 references


def _reference_absorption(x, codes, probe, decoder, main):
    """SAEBench's two per-word scores, written out one latent at a time in float64."""
    norm = math.sqrt(sum(v * v for v in probe))
    p = [v / norm for v in probe]
    cos = []
    for row in decoder:
        row_norm = math.sqrt(sum(v * v for v in row))
        cos.append(sum(a * b for a, b in zip(row, p, strict=True)) / row_norm)
    fractions, fulls = [], []
    for x_n, c_n in zip(x, codes, strict=True):
        total = sum(a * b for a, b in zip(x_n, p, strict=True))
        shares = [c * s for c, s in zip(c_n, cos, strict=True)]
        m = sum(shares[f] for f in main)
        others = sorted(
            (shares[f] for f in range(len(shares)) if f not in main and cos[f] >= 0.1),
            reverse=True,
        )
        absorbed = sum([s for s in others if s > 0][:3])
        if total <= 0 or m >= total or absorbed / total < 0.4:
            fraction = 0.0
        elif m <= 0:
            fraction = 1.0
        else:
            a = min(absorbed, total - m)
            fraction = min(max(a / (a + m), 0.0), 1.0)
        top = max(range(len(shares)), key=lambda f: shares[f])
        full = (
            all(c_n[f] < 1e-8 for f in main)
            and cos[top] >= 0.025
            and total >= 0
            and shares[top] / total >= 0.4
        )
        fractions.append(fraction)
        fulls.append(full)
    return fractions, fulls


def _random_case(seed=0, n=300, n_features=6, n_latents=10):
    """Codes, decoder and a probe (the first axis) that reach every branch of the scores.

    Latents 0 and 1 (the main latents) and 2..5 lean towards the probe by random
    amounts; the main latents are silent on about a quarter of the words each.
    """
    rng = np.random.default_rng(seed)
    decoder = rng.normal(size=(n_latents, n_features))
    decoder[:6, 0] += rng.uniform(0.0, 3.0, size=6)
    probe = np.eye(n_features)[0] * 2.0
    codes = rng.uniform(0, 2, size=(n, n_latents)) * (rng.random((n, n_latents)) < 0.3)
    codes[:, :2] = rng.uniform(0, 2, size=(n, 2)) * (rng.random((n, 2)) < 0.75)
    x = codes @ decoder + 0.3 * rng.normal(size=(n, n_features))
    return x, codes, probe, decoder


def test_probe_projections_match_reference():
    x, codes, probe, decoder = _random_case()
    projection, share, cos = probe_projections(
        x.astype(np.float32), codes.astype(np.float32), probe, decoder.astype(np.float32)
    )
    unit = probe / np.sqrt((probe**2).sum())
    expected_cos = [row @ unit / np.sqrt((row**2).sum()) for row in decoder]
    np.testing.assert_allclose(cos, expected_cos, rtol=1e-6)
    np.testing.assert_allclose(projection, [row @ unit for row in x], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(share, codes * np.array(expected_cos), rtol=1e-6, atol=1e-7)


def test_probe_projections_zero_decoder_row_has_cosine_zero():
    _, _, cos = probe_projections(np.ones((1, 2)), np.ones((1, 2)), [1.0, 0.0], [[0, 0], [1, 0]])
    np.testing.assert_array_equal(cos, [0.0, 1.0])


def test_absorption_scores_match_reference():
    x, codes, probe, decoder = _random_case()
    main = [0, 1]
    fraction, full = absorption_scores(x, codes, probe, decoder, main)
    expected_fraction, expected_full = _reference_absorption(
        x.tolist(), codes.tolist(), probe.tolist(), decoder.tolist(), main
    )
    np.testing.assert_allclose(fraction, expected_fraction, atol=1e-12)
    np.testing.assert_array_equal(full, expected_full)
    # The case reaches every branch of the fraction and both full-absorption outcomes.
    assert (fraction == 0).any() and (fraction == 1).any()
    assert ((fraction > 0) & (fraction < 1)).any()
    assert full.any() and not full.all()


def test_absorption_scores_hand_made_values():
    # The probe is the first axis; latent 0 is the main latent, latent 1 is at 45 degrees.
    decoder = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    r2 = np.sqrt(2)
    codes = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, r2, 0.0], [1.0, 1.0, 0.0]])
    x = codes @ decoder
    fraction, full = absorption_scores(x, codes, [3.0, 0.0], decoder, [0])
    # word 0: the main latent carries the projection 2 -> 0
    # word 1: latent 1 carries 2 / r2 of a projection of 2 (>= 0.4), main silent -> 1, full
    # word 2: projection 1 + r2, main 1, absorber 1 (0.41 of it) -> 1 / (1 + 1)
    # word 3: projection 2, main 1, absorber 1 / r2 (0.35 < 0.4 of it) -> 0
    np.testing.assert_allclose(fraction, [0.0, 1.0, 0.5, 0.0], atol=1e-12)
    np.testing.assert_array_equal(full, [False, True, False, False])


def _probe_objective_gradient(X, y, weight, bias):
    """Gradient of SAEBench's per-probe loss: mean weighted BCE / 26 + 1e-4/2 |w|^2."""
    pos_weight = (len(y) - y.sum()) / y.sum()
    sample = np.where(y, pos_weight, 1.0)
    z = X @ weight + bias
    residual = sample * (1 / (1 + np.exp(-z)) - y)
    grad_w = X.T @ residual / len(y) / 26 + 1e-4 * weight
    grad_b = residual.sum() / len(y) / 26
    return grad_w, grad_b


def test_fit_probe_minimises_saebench_objective():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    y = (X @ [1.0, -2.0, 0.5, 0.0, 0.0] + 0.8 * rng.normal(size=300)) > 1.0
    weight, bias = fit_probe(X.astype(np.float32), y)
    grad_w, grad_b = _probe_objective_gradient(X, y, weight, bias)
    scale = np.abs(X.T @ (y - y.mean())).max() / len(y) / 26
    assert np.abs(grad_w).max() < 1e-3 * scale
    assert abs(grad_b) < 1e-3 * scale


# ----------------------------------------------------------- hand-built dictionaries

N_TRAIN, N_TEST, D = 40, 10, 12
ABSORBED = [0, 1, 2, 3]  # test words of "a" whose main latent is silent
HALF = 4  # test word of "a" shared half and half with the absorbing latent


def _dictionary():
    """Decoder: 0 "a", 1 and 4 "b" (split), 2 "c", 3 absorbing "a" (e0 + e3)."""
    decoder = np.zeros((5, D))
    decoder[0, 0] = decoder[1, 1] = decoder[2, 2] = decoder[4, 1] = 1.0
    decoder[3, [0, 3]] = 1 / np.sqrt(2)
    return decoder


def _letter_data(absorb, seed=0):
    """Train and test words of letters a, b, c as codes and activations (codes @ W_dec)."""
    rng = np.random.default_rng(seed)
    decoder = _dictionary()
    splits = []
    for n, is_test in ((N_TRAIN, False), (N_TEST, True)):
        codes, labels = [], []
        for letter in range(3):
            block = np.zeros((n, 5))
            value = rng.uniform(2, 3, size=n)
            if letter == 1:  # "b" is split: half its words on latent 1, half on latent 4
                block[: n // 2, 1] = value[: n // 2]
                block[n // 2 :, 4] = value[n // 2 :]
            else:
                block[:, 0 if letter == 0 else 2] = value
            if letter == 0 and is_test and absorb:
                block[ABSORBED, 0] = 0.0
                block[ABSORBED, 3] = value[ABSORBED] * np.sqrt(2)
                block[HALF, 0] = value[HALF] / 2
                block[HALF, 3] = value[HALF] / 2 * np.sqrt(2)
            codes.append(block)
            labels += [letter] * n
        codes = np.concatenate(codes)
        x = codes @ decoder + 0.02 * rng.normal(size=(len(codes), D))
        splits.append((x.astype(np.float32), np.array(labels), codes.astype(np.float32)))
    words = [f" {'abc'[label]}{i}" for i, label in enumerate(splits[1][1])]
    return splits, decoder, words


def _score(absorb):
    (x_tr, y_tr, c_tr), (x_te, y_te, c_te) = _letter_data(absorb)[0]
    _, decoder, words = _letter_data(absorb)
    table = score_letters(
        x_tr, y_tr, c_tr, x_te, y_te, c_te, decoder, words=words, max_k=4, f1_jump_threshold=0.03
    )
    return table, words


def test_clean_dictionary_has_no_absorption():
    table, _ = _score(absorb=False)
    assert [row["letter"] for row in table] == ["a", "b", "c"]
    for row in table:
        assert row["probe_f1"] == 1.0
        assert row["n_probe_true_positives"] == N_TEST
        assert row["mean_absorption_fraction"] == 0.0
        assert row["full_absorption_rate"] == 0.0
    assert table[0]["main_latents"] == [0]
    assert table[2]["main_latents"] == [2]


def test_absorption_detected_for_exactly_the_absorbed_words():
    table, words = _score(absorb=True)
    row_a = table[0]
    assert row_a["main_latents"] == [0]
    assert row_a["n_probe_true_positives"] == N_TEST
    assert row_a["full_absorption_words"] == [words[i] for i in ABSORBED]
    assert row_a["num_full_absorption"] == len(ABSORBED)
    # four words fully absorbed (fraction 1), one half (about 0.5), the rest clean (0)
    expected = (len(ABSORBED) + 0.5) / N_TEST
    assert row_a["mean_absorption_fraction"] == pytest.approx(expected, abs=0.02)
    for row in table[1:]:
        assert row["mean_absorption_fraction"] == 0.0
        assert row["num_full_absorption"] == 0


def test_split_letter_counts_two_latents():
    table, _ = _score(absorb=False)
    row_b = table[1]
    assert sorted(row_b["main_latents"]) == [1, 4]
    assert row_b["num_split_features"] == 2
    assert row_b["k_sparse_f1"][1] == 1.0 and row_b["k_sparse_f1"][0] < 0.8
    assert summarise(table)["mean_num_split_features"] == pytest.approx(4 / 3)


def test_split_features_needs_a_gain_above_the_threshold():
    # latents 0 and 1 each cover half of the letter's words: k=1 has F1 2/3, k=2 has 1
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2 == 0
    codes = np.zeros((40, 3))
    codes[np.flatnonzero(y)[:10], 0] = rng.uniform(1, 2, size=10)
    codes[np.flatnonzero(y)[10:], 1] = rng.uniform(1, 2, size=10)
    main, f1s = split_features(codes, y, codes, y, max_k=3, f1_jump_threshold=0.03)
    assert sorted(main) == [0, 1]
    assert f1s[:2] == [pytest.approx(2 / 3), 1.0]
    main, _ = split_features(codes, y, codes, y, max_k=3, f1_jump_threshold=0.5)
    assert len(main) == 1


def test_summarise_means_over_letters_with_true_positives():
    rows = [
        dict(
            letter="a",
            probe_f1=0.9,
            n_probe_true_positives=4,
            mean_absorption_fraction=0.5,
            full_absorption_rate=0.25,
            num_split_features=1,
        ),
        dict(
            letter="b",
            probe_f1=0.7,
            n_probe_true_positives=2,
            mean_absorption_fraction=0.1,
            full_absorption_rate=0.0,
            num_split_features=3,
        ),
        dict(
            letter="c",
            probe_f1=0.1,
            n_probe_true_positives=0,
            mean_absorption_fraction=float("nan"),
            full_absorption_rate=float("nan"),
            num_split_features=2,
        ),
    ]
    scores = summarise(rows)
    assert scores["mean_absorption_fraction_score"] == pytest.approx(0.3)
    assert scores["mean_full_absorption_score"] == pytest.approx(0.125)
    assert scores["mean_num_split_features"] == pytest.approx(2.0)
    assert scores["std_dev_num_split_features"] == pytest.approx(np.sqrt(2.0))
    assert scores["n_letters"] == 2
    assert scores["n_letters_probe_f1_above_0.6"] == 2
    assert scores["mean_probe_f1"] == pytest.approx(1.7 / 3)


# ----------------------------------------------------------- tokenizer and model

# Three pseudo-words per letter, each a single token after a space once BPE has seen them.
WORDS = [f"{letter}{tail}" for letter in LETTERS for tail in ("ax", "ol", "um")]


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE that knows WORDS and the prompt as tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines = [f" {w} has the first letter: {w[0].upper()}" for w in WORDS] * 4
    lines += ["two-letter x1 42"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LlamaConfig(
            num_hidden_layers=2,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("bpe_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def word_sae():
    X = np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32)
    return SparseAutoencoder(n_components=32, k=4, max_iter=1, random_state=0).fit(X)


def test_single_token_words_from_vocabulary(word_model_dir):
    tokenizer = ActivationExtractor(word_model_dir).load()[1]
    found = single_token_words(tokenizer, None, min_length=2)
    texts = [text for text, _ in found]
    assert {" " + w for w in WORDS} <= set(texts)
    assert all(t.startswith(" ") and t[1:].isalpha() and len(t) > 2 for t in texts)
    for text, token in found:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [token]


def test_single_token_words_from_a_list(word_model_dir):
    tokenizer = ActivationExtractor(word_model_dir).load()[1]
    found = single_token_words(tokenizer, ["aax", " bol", "aax", "zzzqq", "x1", "a"], 2)
    assert [text for text, _ in found] == [" aax", " bol"]


def test_end_to_end_on_tiny_llama(word_model_dir, word_sae):
    extractor = ActivationExtractor(word_model_dir, layer=1, device="cpu")
    with pytest.warns(FewLettersWarning):
        scores, letters = first_letter_absorption(
            word_sae, extractor, words=WORDS, n_icl_examples=3, max_k=3, random_state=0
        )
    assert {
        "mean_absorption_fraction_score",
        "mean_full_absorption_score",
        "mean_num_split_features",
        "n_words",
        "n_letters",
    } <= set(scores)
    assert scores["n_words"] == len(WORDS)
    assert scores["n_train_words"] + scores["n_test_words"] == len(WORDS)
    assert scores["n_words_dropped"] == 0
    assert all(isinstance(row["main_latents"], list) for row in letters)
    assert all(1 <= row["num_split_features"] <= 3 for row in letters)


def test_max_words_bounds_the_sample(word_model_dir, word_sae):
    extractor = ActivationExtractor(word_model_dir, layer=1, device="cpu")
    with pytest.warns(FewLettersWarning):
        scores, _ = first_letter_absorption(
            word_sae, extractor, max_words=20, n_icl_examples=2, max_k=2
        )
    assert scores["n_words"] == 20


def test_no_usable_words_raises(tiny_model_dir, small_X):
    # the suite's character tokenizer has no word that is one token
    extractor = ActivationExtractor(tiny_model_dir, layer=1, device="cpu")
    sae = SparseAutoencoder(n_components=8, k=2, max_iter=1, random_state=0)
    sae.fit(np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32))
    with pytest.raises(ValueError, match="No usable words"):
        first_letter_absorption(sae, extractor)


def test_sae_of_another_width_raises(word_model_dir, small_X):
    extractor = ActivationExtractor(word_model_dir, layer=1, device="cpu")
    sae = SparseAutoencoder(n_components=8, k=2, max_iter=1, random_state=0).fit(small_X)
    with pytest.raises(ValueError, match="fitted on 8"):
        first_letter_absorption(sae, extractor, words=WORDS, n_icl_examples=2)


def test_prompt_longer_than_context_raises(word_model_dir, word_sae):
    extractor = ActivationExtractor(word_model_dir, layer=1, context_size=16, device="cpu")
    with pytest.raises(ValueError, match="context_size=16"):
        first_letter_absorption(word_sae, extractor, words=WORDS, n_icl_examples=3)


def test_unfitted_sae_raises(word_model_dir):
    from sklearn.exceptions import NotFittedError

    extractor = ActivationExtractor(word_model_dir, layer=1, device="cpu")
    with pytest.raises(NotFittedError):
        first_letter_absorption(SparseAutoencoder(), extractor, words=WORDS)


@pytest.mark.slow
def test_smollm2_knows_first_letters():
    pytest.importorskip("gguf", reason="loading GGUF needs the gguf package")
    pytest.importorskip("accelerate", reason="loading GGUF needs the accelerate package")
    from skSAE import corpora

    try:
        path = corpora.smollm2_path()
        texts = ["\n".join(corpora.pydoc_texts())[:40_000]]  # about 9k tokens
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    extractor = ActivationExtractor(path, layer=6, device="cpu")
    X = extractor.extract(texts).activations
    sae = SparseAutoencoder(n_components=1152, k=32, max_iter=2, random_state=0).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewLettersWarning)
        scores, letters = first_letter_absorption(sae, extractor, max_words=400, random_state=0)
    assert scores["n_words"] >= 390
    # a linear probe reads the first letter from block 6 (0.80 on 3000 words)
    assert scores["mean_probe_f1"] > 0.4
    assert 0.0 <= scores["mean_absorption_fraction_score"] <= 1.0
    assert 0.0 <= scores["mean_full_absorption_score"] <= 1.0
    assert scores["mean_num_split_features"] >= 1.0


def test_evaluate_adds_the_absorption_scores(word_model_dir, word_sae):
    from skSAE.evaluation import evaluate

    extractor = ActivationExtractor(word_model_dir, layer=1, device="cpu")
    held_out = [f" {w} has the first letter: {w[0].upper()}" for w in WORDS[:20]]
    with pytest.warns(FewLettersWarning):
        report = evaluate(word_sae, extractor, held_out, absorption=True)
    with pytest.warns(FewLettersWarning):
        scores, _ = first_letter_absorption(word_sae, extractor, random_state=0)
    for name, value in scores.items():
        assert report[name] == value, name
    assert np.isfinite(report["loss_recovered"]) and report["n_tokens"] > 0


def test_evaluate_passes_absorption_options_on(word_model_dir, word_sae):
    from skSAE.evaluation import evaluate

    extractor = ActivationExtractor(word_model_dir, layer=1, device="cpu")
    held_out = [f" {w} has the first letter: {w[0].upper()}" for w in WORDS[:20]]
    with pytest.warns(FewLettersWarning):
        report = evaluate(word_sae, extractor, held_out, absorption={"max_words": 30})
    with pytest.warns(FewLettersWarning):
        scores, _ = first_letter_absorption(word_sae, extractor, max_words=30, random_state=0)
    assert report["n_words"] == scores["n_words"] <= 30
    assert report["mean_absorption_fraction_score"] == scores["mean_absorption_fraction_score"]
