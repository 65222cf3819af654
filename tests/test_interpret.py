"""Top-activating examples and steering on tiny random GPT-2 and Llama models, offline."""

import numpy as np
import pytest
import torch
from conftest import (
    BYTE_TEXTS,
    TEXTS,
    assert_ranked,
    byte_level_extractor_and_sae,
    code_activation,
    encoder_pre_activations,
    make_byte_level_tokenizer,
    make_char_tokenizer,
    make_tiny_model,
    smollm2_extractor,
    undecided_codes,
)

from skSAE import ActivationExtractor, SparseAutoencoder
from skSAE._top_activations import _logit_effects, token_texts
from skSAE.interpret import (
    ActivatingExample,
    LatentReport,
    _steering_replacement,
    generate_with_steering,
    top_activating_examples,
)

CORPUS = [
    *TEXTS,
    "she sells sea shells by the sea shore, and the shells she sells are sea shells.",
    "all that glitters is not gold, all who wander are not lost.",
    "a stitch in time saves nine, but nine stitches take time.",
    "it was the best of times, it was the worst of times.",
    "the rain in spain stays mainly in the plain.",
    "we shall fight on the beaches, we shall fight on the landing grounds.",
]
N_COMPONENTS = 24
PROMPT = "the quick brown"


def make_model_tokenizer():
    """A character tokenizer whose decode joins characters unspaced."""
    from tokenizers import decoders

    tokenizer = make_char_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    return tokenizer


def make_model_dir(family, folder):
    """A tiny model with `make_model_tokenizer`."""
    make_tiny_model(family).save_pretrained(folder)
    make_model_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def fitted(request, tmp_path_factory):
    """(extractor, sae, extraction, float64 codes) on CORPUS."""
    folder = make_model_dir(request.param, tmp_path_factory.mktemp(request.param))
    extractor = ActivationExtractor(
        str(folder), layer=1, context_size=16, batch_size=3, device="cpu"
    )
    extraction = extractor.extract(CORPUS)
    sae = SparseAutoencoder(
        n_components=N_COMPONENTS, k=4, max_iter=2, batch_size=64, device="cpu", random_state=0
    ).fit(extraction.activations)
    codes = sae.transform(extraction.activations).astype(np.float64)
    return extractor, sae, extraction, codes


def code_at(extraction, codes):
    """{(doc, position): codes row} of every kept token."""
    return {
        (int(d), int(p)): codes[row]
        for row, (d, p) in enumerate(zip(extraction.doc_index, extraction.position, strict=True))
    }


def alive_latents(codes, n=4):
    return [int(i) for i in np.argsort(-(codes > 0).sum(axis=0))[:n]]


# ------------------------------------------------------------ top examples


def test_top_activating_examples_returns_reports_in_requested_order(fitted):
    extractor, sae, _, codes = fitted
    latents = alive_latents(codes)[::-1]
    reports = top_activating_examples(sae, extractor, CORPUS, latents, k=3)
    assert list(reports) == latents
    report = reports[latents[0]]
    assert isinstance(report, LatentReport)
    assert report.latent == latents[0]
    assert all(isinstance(example, ActivatingExample) for example in report.top)


def settled_latents(sae, extraction, latents):
    """``latents`` less those with a code at a cut: the pass over the corpus encodes
    batches of contexts, not the whole extraction, and such a code may fall either way."""
    pre, bound = encoder_pre_activations(sae, extraction.activations)
    undecided = undecided_codes(pre, bound, **code_activation(sae)).any(axis=0)
    kept = [latent for latent in latents if not undecided[latent]]
    assert len(kept) >= len(latents) // 2
    return kept


def test_top_activating_examples_top_is_the_brute_force_top_k(fitted):
    extractor, sae, extraction, codes = fitted
    latents = settled_latents(sae, extraction, alive_latents(codes))
    reports = top_activating_examples(sae, extractor, CORPUS, latents, k=5)
    rows = code_at(extraction, codes)
    for latent in latents:
        column = codes[:, latent]
        expected = np.sort(column[column > 0])[::-1][:5]
        top = reports[latent].top
        values = [example.activation for example in top]
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
        assert values == sorted(values, reverse=True)
        for example in top:  # each example's provenance really has that activation
            assert rows[(example.doc_index, example.position)][latent] == pytest.approx(
                example.activation, rel=1e-5, abs=1e-6
            )
        assert len({(e.doc_index, e.position) for e in top}) == len(top)


def test_top_activating_examples_density_and_max_match_codes(fitted):
    extractor, sae, extraction, codes = fitted
    latents = settled_latents(sae, extraction, list(range(N_COMPONENTS)))
    reports = top_activating_examples(sae, extractor, CORPUS, latents, k=2, n_quantile_samples=0)
    density = (codes > 0).mean(axis=0)
    for latent in latents:
        assert reports[latent].density == pytest.approx(density[latent])
        assert reports[latent].max_activation == pytest.approx(
            codes[:, latent].max(), rel=1e-5, abs=1e-6
        )
        if density[latent] == 0:
            assert reports[latent].top == []


def test_top_activating_examples_windows_hold_codes_and_text(fitted):
    extractor, sae, extraction, codes = fitted
    latents = alive_latents(codes, 3)
    reports = top_activating_examples(sae, extractor, CORPUS, latents, k=4, window=(5, 3))
    rows = code_at(extraction, codes)
    for latent in latents:
        examples = reports[latent].top + [x for _, xs in reports[latent].quantiles for x in xs]
        for example in examples:
            start = example.position - example.marked
            text = CORPUS[example.doc_index]
            # Character tokenizer: token positions are character positions.
            assert "".join(example.tokens) == text[start : start + len(example.tokens)]
            assert start == max(0, example.position - 5)
            assert start + len(example.tokens) == min(len(text), example.position + 4)
            expected = [
                rows[(example.doc_index, p)][latent] if (example.doc_index, p) in rows else 0.0
                for p in range(start, start + len(example.tokens))
            ]
            np.testing.assert_allclose(example.token_activations, expected, rtol=1e-5, atol=1e-6)
            assert example.token_activations[example.marked] == pytest.approx(
                example.activation, rel=1e-5, abs=1e-6
            )


def test_top_activating_examples_quantile_samples_are_seeded_and_real(fitted):
    extractor, sae, extraction, codes = fitted
    latent = alive_latents(codes, 1)[0]
    first = top_activating_examples(sae, extractor, CORPUS, latent, k=2, random_state=0)
    again = top_activating_examples(sae, extractor, CORPUS, latent, k=2, random_state=0)
    assert first[latent].quantiles == again[latent].quantiles
    labels = [label for label, _ in first[latent].quantiles]
    assert labels == ["75-100%", "50-75%", "25-50%", "0-25%"]
    rows = code_at(extraction, codes)
    top = {(e.doc_index, e.position) for e in first[latent].top}
    lowest_seen = np.inf
    for _, examples in first[latent].quantiles:
        assert 1 <= len(examples) <= 3
        for example in examples:
            assert (example.doc_index, example.position) not in top
            assert rows[(example.doc_index, example.position)][latent] == pytest.approx(
                example.activation, rel=1e-5
            )
        # Intervals go down: each one's samples sit at or below the previous one's.
        assert max(e.activation for e in examples) <= lowest_seen + 1e-6
        lowest_seen = min(e.activation for e in examples)


def test_top_activating_examples_histogram_counts_every_firing(fitted):
    extractor, sae, _, codes = fitted
    latents = alive_latents(codes)
    reports = top_activating_examples(sae, extractor, CORPUS, latents, n_quantile_samples=0)
    for latent in latents:
        counts, edges = reports[latent].histogram
        nonzero = codes[:, latent][codes[:, latent] > 0]
        assert len(edges) == len(counts) + 1
        assert counts.sum() == len(nonzero)
        assert edges[0] == 0 and edges[-1] >= nonzero.max() * (1 - 1e-6)
        reference, _ = np.histogram(nonzero, bins=edges)
        assert np.abs(reference - counts).sum() <= 2  # float ties at a bin edge at most


def logit_lens_reference(model, directions_LD):
    """Float64 logit lens by hand: final norm weight (LayerNorm centres first), then W_U."""
    d_LD = np.asarray(directions_LD, dtype=np.float64)
    if hasattr(model, "transformer"):  # GPT-2: LayerNorm ln_f
        norm = model.transformer.ln_f
        d_LD = d_LD - d_LD.mean(axis=1, keepdims=True)
        gain_D = norm.weight.detach().double().numpy()
    elif type(model.model.norm).__name__.startswith("Gemma"):  # RMSNorm times (1 + weight)
        gain_D = 1.0 + model.model.norm.weight.detach().double().numpy()
    else:  # Llama: RMSNorm model.norm
        gain_D = model.model.norm.weight.detach().double().numpy()
    d_LD = d_LD * gain_D
    return d_LD @ model.lm_head.weight.detach().double().numpy().T


def test_top_activating_examples_promoted_tokens_follow_the_unembedding(fitted):
    extractor, sae, _, codes = fitted
    latent = alive_latents(codes, 1)[0]
    report = top_activating_examples(sae, extractor, CORPUS, latent, n_logit_tokens=5)[latent]
    effect_V = logit_lens_reference(extractor.model_, sae.components_[[latent]])[0]
    np.testing.assert_allclose(
        [value for _, value in report.promoted], np.sort(effect_V)[::-1][:5], rtol=1e-4
    )
    np.testing.assert_allclose(
        [value for _, value in report.suppressed], np.sort(effect_V)[:5], rtol=1e-4
    )
    tolerance = 1e-5 * np.abs(effect_V).max()
    text_of = lambda ids: token_texts(extractor.tokenizer_, ids)  # noqa: E731
    assert_ranked([text for text, _ in report.promoted], effect_V, text_of, tolerance)


def random_lm(family, tied):
    """A tiny random causal LM whose final norm's weight is far from its default."""
    model = make_tiny_model(family, n_layers=1, n_positions=32, tied=tied)
    norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    rng = np.random.default_rng(0)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(rng.normal(1.0, 1.0, 16).astype(np.float32)))
    return model


@pytest.mark.parametrize(
    ("family", "tied"), [("llama", False), ("llama", True), ("gpt2", True), ("gemma", True)]
)
def test_logit_effects_equal_a_float64_logit_lens_through_the_final_norm(family, tied):
    model = random_lm(family, tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    tokenizer = make_char_tokenizer()
    directions_LD = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    effects = _logit_effects(model, tokenizer, directions_LD, 6)
    reference_LV = logit_lens_reference(model, directions_LD)
    differs_without_norm = False
    for (promoted, suppressed), effect_V, direction_D in zip(
        effects, reference_LV, directions_LD, strict=True
    ):
        top = np.argsort(-effect_V, kind="stable")[:6]
        bottom = np.argsort(effect_V, kind="stable")[:6]
        # In order, near-ties (float32 against float64) either way.
        tolerance = 1e-5 * np.abs(effect_V).max()
        text_of = lambda ids: token_texts(tokenizer, ids)  # noqa: E731
        assert_ranked([t for t, _ in promoted], effect_V, text_of, tolerance)
        assert_ranked([t for t, _ in suppressed], effect_V, text_of, tolerance, largest=False)
        np.testing.assert_allclose([v for _, v in promoted], effect_V[top], rtol=1e-5)
        np.testing.assert_allclose([v for _, v in suppressed], effect_V[bottom], rtol=1e-5)
        raw_V = model.lm_head.weight.detach().double().numpy() @ direction_D
        differs_without_norm |= set(np.argsort(-raw_V)[:6]) != set(top)
    assert differs_without_norm  # the final norm changes the lists: the test can tell


def test_top_activating_examples_no_lm_head_gives_no_logit_tokens():
    from transformers import GPT2Model

    lm = make_tiny_model("gpt2")
    bare = GPT2Model(lm.config)
    bare.load_state_dict(lm.transformer.state_dict())
    extractor = ActivationExtractor(
        bare.eval(), tokenizer=make_char_tokenizer(), layer=1, context_size=16, device="cpu"
    )
    X = extractor.transform(CORPUS)
    sae = SparseAutoencoder(n_components=8, k=2, max_iter=1, device="cpu", random_state=0).fit(X)
    reports = top_activating_examples(sae, extractor, CORPUS, [0, 1], k=2)
    assert all(r.promoted == [] and r.suppressed == [] for r in reports.values())


@pytest.mark.parametrize("latents", [-1, N_COMPONENTS, [0, 99], 1.5, ["a"], True, [], None])
def test_top_activating_examples_rejects_invalid_latents(fitted, latents):
    extractor, sae, _, _ = fitted
    with pytest.raises(ValueError, match="latent"):
        top_activating_examples(sae, extractor, CORPUS, latents)


LATENT_RANGE = rf"must be latent indices, ints in \[0, {N_COMPONENTS}\) \(n_components of the SAE\)"


@pytest.mark.parametrize(
    ("kwargs", "name", "rest"),
    [
        ({"latents": N_COMPONENTS}, "latents", rf"{LATENT_RANGE}\. Got {N_COMPONENTS} instead\."),
        ({"latents": [0, 99]}, "latents", rf"{LATENT_RANGE}\. Got 99 in \[0, 99\] instead\."),
        ({"latents": [0, True]}, "latents", r"must be .* Got True in \[0, True\] instead\."),
        ({"latents": []}, "latents", r"must be one or more latent indices.* Got \[\] instead\."),
        ({"latents": None}, "latents", r"must be an instance of 'int' or an array-like"),
        ({"k": 0}, "k", r"must be an int in the range \[1, inf\)\. Got 0 instead\."),
        ({"window": (3,)}, "window", r"must be a pair of ints >= 0 .*\. Got \(3,\) instead\."),
        ({"window": (2, -1)}, "window", r"must be a pair of ints >= 0"),
        ({"window": 4}, "window", r"must be an instance of 'tuple' or an instance of 'list'"),
        (
            {"n_quantile_samples": -1},
            "n_quantile_samples",
            r"must be an int in the range \[0, inf\)",
        ),
        ({"n_logit_tokens": 1.5}, "n_logit_tokens", r"must be .* Got 1.5 instead\."),
        ({"texts": "one text"}, "texts", r"must be an array-like\. Got 'one text' instead\."),
    ],
)
def test_top_activating_examples_errors_name_parameter_value_and_expectation(
    fitted, kwargs, name, rest
):
    extractor, sae, _, _ = fitted
    arguments = {"texts": CORPUS, "latents": [0], **kwargs}
    with pytest.raises(
        ValueError, match=rf"The '{name}' parameter of top_activating_examples {rest}"
    ):
        top_activating_examples(sae, extractor, **arguments)


def test_top_activating_examples_reads_each_text_once(fitted, monkeypatch):
    extractor, sae, extraction, codes = fitted
    reads = []  # per call of iter_batches: [texts passed, rows yielded]
    original = type(extractor).iter_batches

    def counting(self, texts, *args, **kwargs):
        read = [list(texts), 0]
        reads.append(read)
        for batch in original(self, texts, *args, **kwargs):
            read[1] += len(batch.activations)
            yield batch

    monkeypatch.setattr(type(extractor), "iter_batches", counting)
    latents = alive_latents(codes, 2)
    reports = top_activating_examples(sae, extractor, CORPUS, latents, k=1, n_quantile_samples=0)
    assert all(report.top for report in reports.values())
    # One read of every text to its last row: the windows are recorded during it.
    assert reads == [[CORPUS, len(extraction.activations)]]


def test_top_activating_examples_with_memory_reads_the_cached_extraction(
    fitted, tmp_path, monkeypatch
):
    from sklearn.base import clone

    extractor, sae, _, codes = fitted
    latents = alive_latents(codes, 3)
    streamed = top_activating_examples(sae, extractor, CORPUS, latents, k=3)
    cached = clone(extractor).set_params(memory=str(tmp_path / "memory"))
    cached.extract(CORPUS)
    reads = []
    original = type(cached).iter_batches

    def counting(self, texts, *args, **kwargs):
        reads.append(list(texts))
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(cached), "iter_batches", counting)
    reports = top_activating_examples(sae, cached, CORPUS, latents, k=3)
    assert reads == []  # the model did not run
    for latent in latents:
        got, expected = reports[latent], streamed[latent]
        assert [(e.doc_index, e.position, e.tokens) for e in got.top] == [
            (e.doc_index, e.position, e.tokens) for e in expected.top
        ]
        for example, reference in zip(got.top, expected.top, strict=True):
            np.testing.assert_allclose(
                example.token_activations, reference.token_activations, rtol=1e-5, atol=1e-6
            )
        assert got.density == expected.density


def test_top_activating_examples_verbose_prints_progress(fitted, capsys):
    extractor, sae, _, codes = fitted
    top_activating_examples(sae, extractor, CORPUS, [0], verbose=1)
    assert "top activations" in capsys.readouterr().out


# ------------------------------------------------------------------ steering


def run_capturing(extractor, call):
    """Run ``call()`` recording the hooked activation before and after any splice.

    The "before" hook is registered first, so it sees the clean output; the next block's
    input is what the splice handed on.
    """
    from skSAE.extraction import _find_blocks

    clean, spliced = [], []
    module = extractor._hook_module()
    next_block = _find_blocks(extractor.model_)[extractor.layer + 1]
    before = module.register_forward_hook(
        lambda m, a, out: clean.append((out[0] if isinstance(out, tuple) else out).clone())
    )
    after = next_block.register_forward_pre_hook(lambda m, args: spliced.append(args[0].clone()))
    try:
        result = call()
    finally:
        before.remove()
        after.remove()
    return result, clean, spliced


def test_generate_with_steering_adds_scaled_direction_at_every_step(fitted):
    extractor, sae, _, _ = fitted
    text, clean, spliced = run_capturing(
        extractor,
        lambda: generate_with_steering(
            sae, extractor, PROMPT, latent=3, scale=4.0, max_new_tokens=5
        ),
    )
    assert text.startswith(PROMPT)
    assert len(clean) == len(spliced) >= 2  # the prompt, then one call per new token
    assert clean[1].shape[1] == 1  # the KV cache passes only the new token
    direction = torch.from_numpy(sae.components_[3])
    for before, after in zip(clean, spliced, strict=True):
        torch.testing.assert_close(after - before, (4.0 * direction).expand_as(before))


def test_generate_with_steering_ablating_one_latent_removes_its_contribution(fitted):
    extractor, sae, _, codes = fitted
    latent = alive_latents(codes, 1)[0]
    _, clean, spliced = run_capturing(
        extractor,
        lambda: generate_with_steering(sae, extractor, PROMPT, ablate=[latent], max_new_tokens=4),
    )
    direction = sae.components_[latent]
    fired = False
    for before, after in zip(clean, spliced, strict=True):
        x = before.reshape(-1, before.shape[-1]).numpy()
        code = sae.transform(x)[:, latent]
        fired |= bool((code > 0).any())
        expected = -code[:, None] * direction[None, :]
        # Rows whose code sits at a cut (it may fall another way in the splice) aside.
        pre, bound = encoder_pre_activations(sae, x)
        settled = ~undecided_codes(pre, bound, **code_activation(sae))[:, latent]
        np.testing.assert_allclose(
            (after - before).reshape(x.shape).numpy()[settled],
            expected[settled],
            rtol=1e-4,
            atol=1e-5,
        )
    assert fired


def test_steering_replacement_ablating_all_latents_keeps_only_bias_and_error(fitted):
    extractor, sae, extraction, _ = fitted
    replace = _steering_replacement(sae, extractor, None, 0.0, list(range(N_COMPONENTS)))
    x = extraction.activations[:20]
    x_hat = sae.inverse_transform(sae.transform(x))
    result = replace(torch.from_numpy(x)[None]).numpy()[0]
    # x + (x_hat_ablated - x_hat) with x_hat_ablated = b_dec_: the error term is kept.
    np.testing.assert_allclose(result, sae.b_dec_ + (x - x_hat), rtol=1e-4, atol=1e-4)


def test_generate_with_steering_without_intervention_equals_clean_model(fitted):
    extractor, sae, _, _ = fitted
    model, tokenizer = extractor.load()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        clean_ids = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        clean_logits = model(input_ids=ids).logits
    for ablate in (None, []):
        text = generate_with_steering(sae, extractor, PROMPT, ablate=ablate, max_new_tokens=8)
        assert text == tokenizer.decode(clean_ids[0], skip_special_tokens=True)
        with extractor.splice(_steering_replacement(sae, extractor, 3, 0.0, ablate)):
            with torch.inference_mode():
                logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, clean_logits)


def test_steering_replacement_ablating_silent_latents_changes_no_logit(fitted):
    extractor, sae, _, _ = fitted
    model, tokenizer = extractor.load()
    # 3 tokens x k=4 active latents each: at least 12 of the 24 latents stay silent.
    ids = tokenizer("the", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        _, clean, _ = run_capturing(extractor, lambda: model(input_ids=ids))
    hooked = clean[0].reshape(-1, clean[0].shape[-1]).numpy()
    # Silent here, and not by a code at its cut (which the splice may compute as active).
    pre, bound = encoder_pre_activations(sae, hooked)
    undecided = undecided_codes(pre, bound, **code_activation(sae)).any(axis=0)
    silent = np.flatnonzero((sae.transform(hooked) == 0).all(axis=0) & ~undecided).tolist()
    assert silent
    with torch.inference_mode():
        clean_logits = model(input_ids=ids).logits
        with extractor.splice(_steering_replacement(sae, extractor, None, 0.0, silent)):
            logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, clean_logits)


def test_generate_with_steering_same_seed_same_text(fitted):
    extractor, sae, _, _ = fitted
    state = torch.random.get_rng_state()
    texts = [
        generate_with_steering(
            sae, extractor, PROMPT, 2, 3.0, do_sample=True, random_state=seed, max_new_tokens=12
        )
        for seed in (7, 7, 8)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched


@pytest.mark.parametrize(
    ("kwargs", "name", "rest"),
    [
        ({"latent": N_COMPONENTS}, "latent", rf"{LATENT_RANGE}\. Got {N_COMPONENTS} instead\."),
        ({"latent": 1.0}, "latent", r"must be an instance of 'int' or None\. Got 1.0 instead\."),
        ({"latent": 0, "scale": float("nan")}, "scale", r"must be a float in the range"),
        ({"latent": 0, "scale": float("inf")}, "scale", r"must be a float in the range"),
        ({"ablate": [-1]}, "ablate", rf"{LATENT_RANGE}\. Got -1 in \[-1\] instead\."),
        (
            {"max_new_tokens": 0},
            "max_new_tokens",
            r"must be an int in the range \[1, inf\)\. Got 0 instead\.",
        ),
        ({"prompt": ["a"]}, "prompt", r"must be an instance of 'str'"),
        # Before: a bare TypeError from the tokenizers library.
        (
            {"prompt": "ab\ud800c"},
            "prompt",
            r"must be valid Unicode.*Got a lone surrogate '\\ud800' at character 2 instead\.",
        ),
    ],
)
def test_generate_with_steering_rejects_invalid_arguments(fitted, kwargs, name, rest):
    extractor, sae, _, _ = fitted
    arguments = {"prompt": PROMPT, **kwargs}
    with pytest.raises(
        ValueError, match=rf"The '{name}' parameter of generate_with_steering {rest}"
    ):
        generate_with_steering(sae, extractor, **arguments)


def test_generate_with_steering_may_ablate_no_latent(fitted):
    extractor, sae, _, _ = fitted
    assert generate_with_steering(sae, extractor, PROMPT, ablate=[], max_new_tokens=2)


def test_generate_with_steering_rejects_a_model_without_lm_head():
    from transformers import GPT2Model

    extractor = ActivationExtractor(
        GPT2Model(make_tiny_model("gpt2").config).eval(),
        tokenizer=make_char_tokenizer(),
        layer=1,
        device="cpu",
    )
    X = np.random.default_rng(0).normal(size=(64, 16))
    sae = SparseAutoencoder(n_components=8, k=2, max_iter=1, device="cpu", random_state=0).fit(X)
    with pytest.raises(ValueError, match="language-model head"):
        generate_with_steering(sae, extractor, PROMPT)


# ------------------------------------------------------------------ token text


def test_token_texts_of_a_byte_level_bpe_show_bytes_never_a_replacement_character():
    tokenizer = make_byte_level_tokenizer()
    text = "the king’s snow ☃ — naïve\n"  # ☃ is in no merge: three lone bytes
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)  # the defect
    tokens = token_texts(tokenizer, ids)
    assert len(tokens) == len(ids)
    assert "\ufffd" not in "".join(tokens)
    assert " king" in tokens and "\n" in tokens  # Ġ is a space, Ċ a newline
    # Complete characters read as themselves; the bytes of a split one as hex.
    shown = text.replace("☃", "<0xE2><0x98><0x83>").replace("ï", "<0xC3><0xAF>")
    assert "".join(tokens) == shown


def test_token_texts_of_every_byte_level_token_match_decode_where_it_is_whole():
    tokenizer = make_byte_level_tokenizer()
    for token_id in range(len(tokenizer)):
        (text,) = token_texts(tokenizer, [token_id])
        decoded = tokenizer.decode([token_id])
        assert "\ufffd" not in text
        if "\ufffd" not in decoded:
            assert text == decoded
        else:
            assert "<0x" in text


def test_token_texts_of_a_character_tokenizer_are_its_characters():
    tokenizer = make_model_tokenizer()
    text = "to be, or not"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert token_texts(tokenizer, ids) == list(text)


def test_top_activating_examples_with_a_byte_level_tokenizer_shows_no_replacement_character():
    texts = [t.replace("gold", "gold ☃") for t in BYTE_TEXTS[:6]]
    extractor, sae = byte_level_extractor_and_sae(texts)
    reports = top_activating_examples(sae, extractor, texts, list(range(16)), k=3)
    shown = [
        token
        for report in reports.values()
        for example in report.top + [x for _, xs in report.quantiles for x in xs]
        for token in example.tokens
    ]
    shown += [t for report in reports.values() for t, _ in report.promoted + report.suppressed]
    assert shown and not any("\ufffd" in token for token in shown)


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_extractor().load()


@pytest.mark.slow
def test_token_texts_of_smollm2_are_readable(smollm2):
    _, tokenizer = smollm2
    ids = list(range(len(tokenizer)))
    texts = token_texts(tokenizer, ids)
    alone = [tokenizer.decode([i]) for i in ids]
    assert sum("\ufffd" in t for t in alone) > 100  # the defect: 314 tokens
    # Only the token that is the character U+FFFD itself (bytes EF BF BD) shows it.
    assert [t for t in texts if "\ufffd" in t] == ["\ufffd"]
    by_string = dict(zip(tokenizer.convert_ids_to_tokens(ids), texts, strict=True))
    assert by_string["Ġthe"] == " the" and by_string["Ċ"] == "\n"
    assert by_string["âĢĻ"] == "’"  # a whole character in one token
    assert by_string["¡"] == "<0xA1>"  # a UTF-8 continuation byte alone


@pytest.mark.slow
def test_logit_effects_of_smollm2_equal_a_float64_logit_lens(smollm2):
    model, tokenizer = smollm2
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    directions_LD = np.random.default_rng(0).normal(size=(4, 576)).astype(np.float32)
    directions_LD /= np.linalg.norm(directions_LD, axis=1, keepdims=True)
    effects = _logit_effects(model, tokenizer, directions_LD, 10)
    reference_LV = logit_lens_reference(model, directions_LD)
    for (promoted, suppressed), effect_V in zip(effects, reference_LV, strict=True):
        top = np.argsort(-effect_V, kind="stable")[:10]
        # In order, near-ties (float32 against float64) either way.
        tolerance = 1e-4 * np.abs(effect_V).max()
        text_of = lambda ids: token_texts(tokenizer, ids, byte_level=True)  # noqa: E731
        assert_ranked([t for t, _ in promoted], effect_V, text_of, tolerance)
        assert_ranked([t for t, _ in suppressed], effect_V, text_of, tolerance, largest=False)
        np.testing.assert_allclose([v for _, v in promoted], effect_V[top], rtol=1e-4)
