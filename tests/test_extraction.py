"""ActivationExtractor on tiny random GPT-2 and Llama models, offline."""

import pickle
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from conftest import TEXTS, make_char_tokenizer, make_tiny_model
from sklearn.pipeline import Pipeline

from skSAE import ActivationCache, ActivationExtractor, SparseAutoencoder
from skSAE.metrics import loss_recovered, loss_recovered_details


def extractor_for(folder, **params):
    return ActivationExtractor(
        str(folder), layer=1, context_size=16, batch_size=3, device="cpu", **params
    )


def hidden_states(extractor, text_ids, layer):
    """Reference: the model's own output_hidden_states for one context."""
    model = extractor.model_
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([text_ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0].numpy()


def test_resid_post_equals_output_hidden_states(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir, drop_first_position=False)
    result = extractor.extract(TEXTS[:1])
    ids = extractor.tokenizer_(TEXTS[0], add_special_tokens=False)["input_ids"]
    expected = np.concatenate(
        [hidden_states(extractor, ids[start : start + 16], 1) for start in range(0, len(ids), 16)]
    )
    np.testing.assert_allclose(result.activations, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.token_ids, ids)
    np.testing.assert_array_equal(result.position, np.arange(len(ids)))
    assert (result.doc_index == 0).all()


def test_last_block_is_block_output_not_final_norm(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir, drop_first_position=False).set_params(layer=2)
    acts = extractor.transform(TEXTS[:1])
    ids = extractor.tokenizer_(TEXTS[0], add_special_tokens=False)["input_ids"][:16]
    with torch.inference_mode():
        out = extractor.model_(input_ids=torch.tensor([ids]), output_hidden_states=True)
    final_normed = out.hidden_states[-1][0].numpy()
    assert not np.allclose(acts[:16], final_normed, atol=1e-3)


def test_padding_does_not_change_rows(tiny_model_dir):
    batched = extractor_for(tiny_model_dir).extract(TEXTS)
    alone = [extractor_for(tiny_model_dir).extract([text]) for text in TEXTS if len(text) > 1]
    np.testing.assert_allclose(
        batched.activations, np.concatenate([r.activations for r in alone]), rtol=1e-5, atol=1e-5
    )
    assert np.isin(batched.doc_index, [0, 1, 3]).all()  # "a" has only a first position


def test_drop_first_position_drops_one_row_per_context(tiny_model_dir):
    kept = extractor_for(tiny_model_dir).extract(TEXTS)
    every = extractor_for(tiny_model_dir, drop_first_position=False).extract(TEXTS)
    n_contexts = sum(-(-len(text) // 16) for text in TEXTS)
    assert every.activations.shape[0] - kept.activations.shape[0] == n_contexts
    assert not np.isin(kept.position, np.arange(0, 200, 16)).any()


def test_special_tokens_excluded_by_default(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path)
    make_char_tokenizer(add_bos=True).save_pretrained(tmp_path)
    without = extractor_for(tmp_path, drop_first_position=False).extract(TEXTS[:2])
    assert 1 not in without.token_ids  # <bos>
    assert without.activations.shape[0] == len(TEXTS[0]) + len(TEXTS[1])
    with_bos = extractor_for(
        tmp_path, drop_first_position=False, exclude_special_tokens=False
    ).extract(TEXTS[:2])
    n_contexts = sum(-(-len(text) // 15) for text in TEXTS[:2])
    assert (with_bos.token_ids == 1).sum() == n_contexts
    assert (with_bos.position[with_bos.token_ids == 1] == -1).all()


@pytest.mark.parametrize("hook", ["attn_out", "mlp_out"])
def test_submodule_hooks_capture_their_module(tiny_model_dir, hook):
    extractor = extractor_for(tiny_model_dir, hook=hook, drop_first_position=False)
    acts = extractor.transform(TEXTS[:1])
    model = extractor.model_
    block = extractor._hook_module()
    captured = []
    handle = block.register_forward_hook(
        lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    ids = extractor.tokenizer_(TEXTS[0], add_special_tokens=False)["input_ids"][:16]
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]))
    handle.remove()
    np.testing.assert_allclose(acts[:16], captured[0][0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(acts[:16], hidden_states(extractor, ids, 1), atol=1e-3)


def test_module_path_hook(tiny_model_dir):
    model = extractor_for(tiny_model_dir).load()[0]
    path = next(name for name, _ in model.named_modules() if name.endswith("1.mlp"))
    by_path = extractor_for(tiny_model_dir, hook=path).transform(TEXTS[:2])
    by_name = extractor_for(tiny_model_dir, hook="mlp_out").transform(TEXTS[:2])
    np.testing.assert_array_equal(by_path, by_name)


def test_forward_stops_after_hooked_block(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir).set_params(layer=0)
    extractor.load()
    from skSAE.extraction import _find_blocks

    calls = []
    handle = _find_blocks(extractor.model_)[2].register_forward_hook(lambda *a: calls.append(1))
    extractor.transform(TEXTS)
    handle.remove()
    assert calls == []


def test_unknown_hook_lists_valid_choices(tiny_model_dir):
    with pytest.raises(ValueError, match=r"resid_post.*attn_out.*mlp_out"):
        extractor_for(tiny_model_dir, hook="resid_pre").transform(TEXTS)


def test_layer_out_of_range_names_valid_range(tiny_model_dir):
    with pytest.raises(ValueError, match=r"layer=7 .* 0\.\.2"):
        extractor_for(tiny_model_dir).set_params(layer=7).transform(TEXTS)


@pytest.mark.parametrize(
    ("texts", "message"),
    [("one string", "single str"), ([], "empty"), (["ok", 3], "int")],
)
def test_bad_texts_raise(tiny_model_dir, texts, message):
    with pytest.raises(ValueError, match=message):
        extractor_for(tiny_model_dir).transform(texts)


def test_unloadable_model_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="could not be loaded"):
        ActivationExtractor(str(tmp_path / "missing"), device="cpu").transform(TEXTS)


def test_fit_loads_nothing(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir).fit(TEXTS)
    assert not hasattr(extractor, "model_")


def test_tokens_per_second_reported(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    extractor.transform(TEXTS)
    assert extractor.tokens_per_second_ > 0


# ------------------------------------------------------------------------- splice


def test_identity_splice_leaves_loss_unchanged(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    losses = extractor.spliced_losses(TEXTS, {"identity": lambda hidden: hidden.clone()})
    assert losses.spliced["identity"] == pytest.approx(losses.clean, abs=1e-6)
    assert losses.kl["identity"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < losses.clean < 2 * np.log(64)


def test_zero_splice_equals_manual_zero_ablation(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    spliced = extractor.cross_entropy(TEXTS[:2], replacement=torch.zeros_like)
    # Reference: zero the block output at every position but the first, by hand.
    model, tokenizer = extractor.load()
    block = extractor._hook_module()

    def zero_after_first(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = torch.cat([hidden[:, :1], torch.zeros_like(hidden[:, 1:])], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    total, count = 0.0, 0
    handle = block.register_forward_hook(zero_after_first)
    with torch.inference_mode():
        for text in TEXTS[:2]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), 16):
                piece = torch.tensor([ids[start : start + 16]])
                logits = model(input_ids=piece).logits[0, :-1]
                total += float(
                    torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum")
                )
                count += piece.shape[1] - 1
    handle.remove()
    assert spliced == pytest.approx(total / count, rel=1e-5)
    assert abs(spliced - extractor.cross_entropy(TEXTS[:2])) > 1e-4


def perfect_sae(width):
    """An SAE whose reconstruction is exactly its input: codes relu(x), relu(-x)."""
    sae = SparseAutoencoder(
        n_components=2 * width, architecture="relu", max_iter=1, random_state=0
    ).fit(np.random.default_rng(0).normal(size=(8, width)))
    eye = np.eye(width, dtype=np.float32)
    sae.W_enc_ = np.hstack([eye, -eye])
    sae.b_enc_ = np.zeros(2 * width, dtype=np.float32)
    sae.components_ = np.vstack([eye, -eye])
    sae.b_dec_ = np.zeros(width, dtype=np.float32)
    return sae


def test_loss_recovered_of_perfect_reconstruction_is_one(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    details = loss_recovered_details(perfect_sae(16), extractor, TEXTS)
    assert details.score == pytest.approx(1.0, abs=1e-5)
    assert details.kl_sae == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_loss_recovered_of_ablation_itself_is_zero(tiny_model_dir, ablation):
    extractor = extractor_for(tiny_model_dir)
    sae = perfect_sae(16)
    sae.components_ = np.zeros_like(sae.components_)
    if ablation == "mean":
        sae.b_dec_ = extractor.transform(TEXTS).mean(axis=0)
    assert loss_recovered(sae, extractor, TEXTS, ablation=ablation) == pytest.approx(0.0, abs=1e-4)


def test_loss_recovered_rejects_wrong_width(tiny_model_dir):
    with pytest.raises(ValueError, match="16 features"):
        loss_recovered(perfect_sae(8), extractor_for(tiny_model_dir), TEXTS)


# -------------------------------------------------------------- store and pickle


def test_store_equals_in_memory_and_trains_sae(tiny_model_dir, tmp_path):
    extractor = extractor_for(tiny_model_dir)
    cache = extractor.extract(TEXTS, store=tmp_path / "acts.h5")
    expected = extractor.extract(TEXTS)
    stored = cache.read()
    for got, want in zip(stored, expected, strict=False):
        np.testing.assert_array_equal(got, want)
    assert cache.attrs["hook"] == "resid_post" and cache.attrs["complete"]
    with cache.open() as file:
        sae = SparseAutoencoder(n_components=32, k=4, max_iter=2, random_state=0)
        sae.fit(file["activations"])
    assert sae.n_features_in_ == 16


def test_interrupted_store_resumes(tiny_model_dir, tmp_path, monkeypatch):
    texts = TEXTS * 3
    extractor = extractor_for(tiny_model_dir)
    original = ActivationExtractor.iter_batches

    def interrupted(self, texts, first_document=0):
        for count, batch in enumerate(original(self, texts, first_document)):
            if count == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(ActivationExtractor, "iter_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extractor.extract(texts, store=tmp_path / "acts.h5")
    partial = ActivationCache(tmp_path / "acts.h5")
    assert not partial.attrs["complete"] and 0 < partial.n_rows
    monkeypatch.setattr(ActivationExtractor, "iter_batches", original)
    resumed = extractor.extract(texts, store=tmp_path / "acts.h5").read()
    expected = extractor.extract(texts)
    for got, want in zip(resumed, expected, strict=False):
        np.testing.assert_array_equal(got, want)


def test_store_of_other_extraction_is_refused(tiny_model_dir, tmp_path):
    extractor_for(tiny_model_dir).extract(TEXTS, store=tmp_path / "acts.h5")
    with pytest.raises(ValueError, match="layer"):
        extractor_for(tiny_model_dir).set_params(layer=0).extract(TEXTS, store=tmp_path / "acts.h5")


def test_unreadable_store_raises(tmp_path):
    (tmp_path / "bad.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        ActivationCache(tmp_path / "bad.h5").read()


def test_pickle_stores_path_not_weights(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    acts = extractor.transform(TEXTS)
    data = pickle.dumps(extractor)
    assert "model_" not in extractor.__getstate__()
    restored = pickle.loads(data)
    assert not hasattr(restored, "model_")
    np.testing.assert_array_equal(restored.transform(TEXTS), acts)


def test_pipeline_round_trips_with_joblib(tiny_model_dir, tmp_path):
    pipe = Pipeline(
        [
            ("acts", extractor_for(tiny_model_dir)),
            ("sae", SparseAutoencoder(n_components=32, k=4, max_iter=2, random_state=0)),
        ]
    ).fit(TEXTS)
    joblib.dump(pipe, tmp_path / "pipe.joblib")
    loaded = joblib.load(tmp_path / "pipe.joblib")
    np.testing.assert_array_equal(loaded.transform(TEXTS), pipe.transform(TEXTS))


def test_clone_shares_loaded_model():
    from sklearn.base import clone

    model = make_tiny_model("gpt2")
    extractor = ActivationExtractor(model, tokenizer=make_char_tokenizer(), layer=1)
    assert clone(extractor).model is model
    assert extractor.transform(TEXTS[:1]).shape[1] == 16


def test_steering_splice_adds_scaled_direction(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    direction = torch.randn(16, generator=torch.Generator().manual_seed(0))
    clean, steered = [], []
    module = extractor._hook_module()
    record = module.register_forward_hook(
        lambda m, a, out: clean.append((out[0] if isinstance(out, tuple) else out).clone())
    )
    with extractor.splice(lambda hidden: hidden + 2.5 * direction) as model:
        after = module.register_forward_hook(
            lambda m, a, out: steered.append(out[0] if isinstance(out, tuple) else out)
        )
        with torch.inference_mode():
            model(input_ids=torch.tensor([[3, 4, 5, 6]]))
        after.remove()
    record.remove()
    torch.testing.assert_close(steered[0] - clean[0], (2.5 * direction).expand(1, 4, 16))


def test_sae_reconstruction_outside_inference_mode_builds_no_graph(tiny_model_dir):
    from skSAE._loss_recovered import _reconstruction

    reconstruct = _reconstruction(perfect_sae(16), extractor_for(tiny_model_dir))
    hidden = torch.randn(1, 3, 16)
    out = reconstruct(hidden)
    assert not out.requires_grad
    torch.testing.assert_close(out, hidden)


def test_iter_batches_concatenate_to_extract(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    texts = TEXTS * 2
    batches = list(extractor.iter_batches(texts))
    assert len(batches) > 1
    whole = extractor.extract(texts)
    for name in whole._fields:
        np.testing.assert_array_equal(
            np.concatenate([getattr(batch, name) for batch in batches]), getattr(whole, name)
        )
    done = [batch.documents_done for batch in batches]
    assert done == sorted(done) and done[-1] == len(texts)
    # Every text before documents_done has all its rows in the batches so far.
    seen = np.array([], dtype=np.int64)
    for batch in batches:
        seen = np.concatenate([seen, batch.doc_index])
        for doc in range(batch.documents_done):
            assert (seen == doc).sum() == (whole.doc_index == doc).sum()


def test_iter_batches_from_first_document_skips_earlier_texts(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    whole = extractor.extract(TEXTS)
    rest = list(extractor.iter_batches(TEXTS, first_document=1))
    doc_index = np.concatenate([batch.doc_index for batch in rest])
    np.testing.assert_array_equal(doc_index, whole.doc_index[whole.doc_index >= 1])
    with pytest.raises(ValueError, match=r"first_document must be an int in 0\.\.4"):
        extractor.iter_batches(TEXTS, first_document=5)


def test_load_returns_the_kept_model_and_tokenizer(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    model, tokenizer = extractor.load()
    assert model is extractor.model_ and tokenizer is extractor.tokenizer_
    assert extractor.load()[0] is model
    assert not model.training


# ------------------------------------------------------- schema, key, validation


def test_one_row_schema_for_memory_store_and_batches():
    from skSAE import cache, extraction

    assert extraction.Extraction is cache.Extraction
    assert extraction.ExtractedBatch._fields[:-1] == cache.Extraction._fields


def test_extraction_key_names_every_setting_that_changes_rows(tiny_model_dir):
    key = extractor_for(tiny_model_dir).extraction_key()
    assert set(key) == {
        "model",
        "tokenizer",
        "hook",
        "layer",
        "context_size",
        "dtype",
        "exclude_special_tokens",
        "drop_first_position",
        "max_norm_ratio",
        "batch_size",  # max_norm_ratio's median is taken per forward batch
        "sksae_version",
    }
    # Settings that do not change the rows leave the key as it is.
    same = extractor_for(tiny_model_dir, verbose=1).set_params(device="cpu", cache_dir="x")
    assert same.extraction_key() == key
    assert extractor_for(tiny_model_dir, tokenizer=make_char_tokenizer()).extraction_key() != key


def test_memory_key_follows_content_not_path(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / Path(tiny_model_dir).name
    shutil.copytree(tiny_model_dir, copy)
    first = extractor_for(tiny_model_dir, memory=tmp_path / "memory")
    expected = first.extract(TEXTS)
    assert extractor_for(copy).extraction_key() == first.extraction_key()
    calls = []
    original = ActivationExtractor._extract_now
    monkeypatch.setattr(
        ActivationExtractor,
        "_extract_now",
        lambda self, texts: calls.append(1) or original(self, texts),
    )
    moved = extractor_for(copy, memory=tmp_path / "memory").extract(TEXTS)
    assert calls == []  # the copy hits the cache of the original
    np.testing.assert_array_equal(moved.activations, expected.activations)


def test_set_params_model_after_load_extracts_the_new_model(tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    make_tiny_model("llama" if "gpt2" in str(tiny_model_dir) else "gpt2").save_pretrained(other)
    make_char_tokenizer().save_pretrained(other)
    extractor = extractor_for(tiny_model_dir)
    extractor.transform(TEXTS)
    switched = extractor.set_params(model=str(other)).transform(TEXTS)
    np.testing.assert_array_equal(switched, extractor_for(other).transform(TEXTS))


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"model": 3}, "model"),
        ({"model": "m", "tokenizer": 3}, "tokenizer"),
        ({"model": "m", "layer": -1}, "layer"),
        ({"model": "m", "max_norm_ratio": 0.5}, "max_norm_ratio"),
    ],
)
def test_invalid_parameters_raise_in_fit_and_in_transform_without_fit(params, name):
    from sklearn.utils._param_validation import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter"):
        ActivationExtractor(**params).fit(TEXTS)
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter"):
        ActivationExtractor(**params).transform(TEXTS)


def test_parameter_constraints_cover_every_parameter():
    from sklearn.utils.estimator_checks import check_param_validation

    check_param_validation("ActivationExtractor", ActivationExtractor("m"))


def test_pickle_of_another_version_warns(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    state = extractor.__getstate__()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pickle.loads(pickle.dumps(extractor))  # same version: silent
    state["_sksae_version"] = "0.0.1"
    restored = ActivationExtractor.__new__(ActivationExtractor)
    with pytest.warns(UserWarning, match=r"saved with skSAE 0\.0\.1 and is loaded with skSAE"):
        restored.__setstate__(state)
    assert restored.get_params() == extractor.get_params()


def test_gguf_key_is_the_content_not_the_path(tmp_path):
    from skSAE.extraction import _gguf_key

    data = np.random.default_rng(0).bytes(3 << 20)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "model.gguf").write_bytes(data)
    (tmp_path / "b" / "renamed.gguf").write_bytes(data)
    (tmp_path / "c.gguf").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    key = _gguf_key(tmp_path / "a" / "model.gguf")
    assert _gguf_key(tmp_path / "b" / "renamed.gguf") == key
    assert _gguf_key(tmp_path / "c.gguf") != key


def test_gguf_converted_once_for_the_same_file_in_two_folders(tmp_path, monkeypatch):
    import transformers

    from skSAE.extraction import _converted_gguf

    conversions = []

    class FakeModel:
        hf_quantizer = None
        config = type("Config", (), {})()

        @classmethod
        def from_pretrained(cls, folder, **kwargs):
            conversions.append(folder)
            return cls()

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "config.json").write_text("{}")

    class FakeTokenizer:
        @classmethod
        def from_pretrained(cls, folder, **kwargs):
            return cls()

        def save_pretrained(self, folder):
            pass

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", FakeModel)
    monkeypatch.setattr(transformers, "AutoTokenizer", FakeTokenizer)
    for venv in ("venv-a", "venv-b"):
        (tmp_path / venv).mkdir()
        (tmp_path / venv / "model.gguf").write_bytes(b"GGUF same bytes")
    first = _converted_gguf(tmp_path / "venv-a" / "model.gguf", tmp_path / "cache")
    second = _converted_gguf(tmp_path / "venv-b" / "model.gguf", tmp_path / "cache")
    assert second == first and len(conversions) == 1


# ------------------------------------------------------------------ loss recovered


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_loss_recovered_with_cached_baselines_runs_one_forward_per_batch(tiny_model_dir, tmp_path):
    extractor = extractor_for(tiny_model_dir, memory=tmp_path)
    n_contexts = sum(-(-len(text) // 16) for text in TEXTS)  # one token per character
    n_batches = -(-n_contexts // 3)
    sae = perfect_sae(16)
    first = loss_recovered(sae, extractor, TEXTS)  # computes and caches the baselines
    calls, handle = count_forwards(extractor.model_)
    again = loss_recovered(sae, extractor, TEXTS)
    handle.remove()
    assert len(calls) == n_batches
    assert again == pytest.approx(first, abs=1e-6)
    calls, handle = count_forwards(extractor.model_)
    extractor.cross_entropy(TEXTS, torch.zeros_like)
    handle.remove()
    assert len(calls) == n_batches


def test_baseline_cross_entropies_equal_the_spliced_losses(tiny_model_dir, tmp_path):
    extractor = extractor_for(tiny_model_dir)
    losses = extractor.spliced_losses(TEXTS, {"zero": torch.zeros_like})
    baselines = extractor.baseline_cross_entropies(TEXTS, "zero")
    assert baselines.clean == pytest.approx(losses.clean, rel=1e-6)
    assert baselines.ablated == pytest.approx(losses.spliced["zero"], rel=1e-6)
    cached = extractor_for(tiny_model_dir, memory=tmp_path).baseline_cross_entropies(TEXTS)
    assert cached == pytest.approx(tuple(baselines), rel=1e-6)


@pytest.mark.parametrize("function", [loss_recovered, loss_recovered_details])
def test_loss_recovered_validates_its_arguments(tiny_model_dir, function):
    from sklearn.utils._param_validation import InvalidParameterError

    extractor = extractor_for(tiny_model_dir)
    with pytest.raises(InvalidParameterError, match="'ablation' parameter"):
        function(perfect_sae(16), extractor, TEXTS, ablation="max")
    with pytest.raises(InvalidParameterError, match="'sae' parameter"):
        function("sae", extractor, TEXTS)


# ------------------------------------------------------------------- norm rule


def batch_median_reference(extractor, texts, ratio):
    """Reference rows of the norm rule: ``max_norm_ratio=None`` rows, filtered per batch."""
    every = list(extractor_for(extractor.model, max_norm_ratio=None).iter_batches(texts))
    kept, ratios = [], []
    for batch in every:
        norms = np.linalg.norm(batch.activations.astype(np.float64), axis=1)
        median = np.sort(norms)[(len(norms) - 1) // 2]  # torch.median's lower middle value
        keep = norms <= ratio * median
        kept.append(batch.activations[keep])
        ratios.append(norms[keep] / median)
    return np.concatenate(kept), np.concatenate(ratios)


def with_massive_activations(extractor, scale=100.0):
    """Scale the residual stream at context position 1 after block 0 (a massive activation).

    Returns the hook handle; the extractor (layer 1) then sees it at that position.
    """
    from skSAE.extraction import _find_blocks

    model, _ = extractor.load()

    def scale_position_1(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = torch.cat([hidden[:, :1], scale * hidden[:, 1:2], hidden[:, 2:]], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return _find_blocks(model)[0].register_forward_hook(scale_position_1)


def test_max_norm_ratio_drops_rows_over_the_batch_median_ratio(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir, max_norm_ratio=1.2)
    acts = extractor.transform(TEXTS * 2)
    expected, ratios = batch_median_reference(extractor, TEXTS * 2, 1.2)
    every = extractor_for(tiny_model_dir, max_norm_ratio=None).transform(TEXTS * 2)
    assert 0 < acts.shape[0] < every.shape[0]  # the rule dropped some rows, not all
    np.testing.assert_array_equal(acts, expected)
    assert ratios.max() <= 1.2


def test_massive_activation_rows_dropped_by_default_kept_with_none(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    handle = with_massive_activations(extractor)
    try:
        kept = extractor.extract(TEXTS)
        whole = extractor.set_params(max_norm_ratio=None).extract(TEXTS)  # the same model
    finally:
        handle.remove()
    massive = whole.position % 16 == 1  # context position 1 (contexts of 16 tokens)
    assert massive.sum() == sum(len(text) // 16 + (len(text) % 16 > 1) for text in TEXTS)
    for name in whole._fields:
        np.testing.assert_array_equal(getattr(kept, name), getattr(whole, name)[~massive])


def test_dropped_positions_are_not_replaced_in_a_splice(tiny_model_dir):
    extractor = extractor_for(tiny_model_dir)
    handle = with_massive_activations(extractor)
    try:
        spliced = extractor.cross_entropy(TEXTS[:2], replacement=torch.zeros_like)
        losses = extractor.spliced_losses(TEXTS[:2], {"zero": torch.zeros_like})
        baselines = extractor.baseline_cross_entropies(TEXTS[:2])
        # Reference: zero the block output at every position but 0 and 1, by hand.
        model, tokenizer = extractor.load()

        def zero_after_second(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = torch.cat([hidden[:, :2], torch.zeros_like(hidden[:, 2:])], dim=1)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        total, count = 0.0, 0
        zeroing = extractor._hook_module().register_forward_hook(zero_after_second)
        with torch.inference_mode():
            for text in TEXTS[:2]:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                for start in range(0, len(ids), 16):
                    piece = torch.tensor([ids[start : start + 16]])
                    logits = model(input_ids=piece).logits[0, :-1]
                    total += float(
                        torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum")
                    )
                    count += piece.shape[1] - 1
        zeroing.remove()
    finally:
        handle.remove()
    assert spliced == pytest.approx(total / count, rel=1e-5)
    assert losses.spliced["zero"] == pytest.approx(spliced, rel=1e-6)
    assert baselines.ablated == pytest.approx(spliced, rel=1e-6)


def test_loss_recovered_splices_sae_and_ablation_at_the_same_positions(tiny_model_dir):
    # An SAE that outputs zeros is the zero ablation only if both replace the same positions.
    extractor = extractor_for(tiny_model_dir, max_norm_ratio=1.2)
    sae = perfect_sae(16)
    sae.components_ = np.zeros_like(sae.components_)
    details = loss_recovered_details(sae, extractor, TEXTS)
    assert details.ce_sae == pytest.approx(details.ce_ablated, rel=1e-6)
    every = extractor_for(tiny_model_dir, max_norm_ratio=None)
    assert extractor.cross_entropy(TEXTS, torch.zeros_like) != pytest.approx(
        every.cross_entropy(TEXTS, torch.zeros_like), rel=1e-6
    )


def test_max_norm_ratio_is_in_the_extraction_key(tiny_model_dir):
    key = extractor_for(tiny_model_dir).extraction_key()
    assert key["max_norm_ratio"] == 15.0
    assert extractor_for(tiny_model_dir, max_norm_ratio=None).extraction_key()[
        "max_norm_ratio"
    ] == float("inf")
    assert extractor_for(tiny_model_dir, max_norm_ratio=1.2).extraction_key() != key


def test_activations_at_reads_one_position_per_text(tiny_model_dir, tmp_path, monkeypatch):
    texts = ["the quick brown fox.", "to be, or not to be.", "ab"]
    extractor = ActivationExtractor(str(tiny_model_dir), layer=1, device="cpu", memory=tmp_path)
    extraction = extractor.extract(texts)
    positions = [3, 7, 0]  # position 0 is never kept (the first of its context)
    rows, found = extractor.activations_at(texts, positions)
    np.testing.assert_array_equal(found, [True, True, False])
    for row, (doc, position) in zip(rows, [(0, 3), (1, 7)], strict=True):
        match = (extraction.doc_index == doc) & (extraction.position == position)
        np.testing.assert_array_equal(row, extraction.activations[match][0])
    calls = []
    original = ActivationExtractor.iter_batches
    monkeypatch.setattr(
        ActivationExtractor, "iter_batches", lambda self, *a: calls.append(1) or original(self, *a)
    )
    again, _ = extractor.activations_at(texts, positions)  # from the memory: no forward
    np.testing.assert_array_equal(again, rows)
    assert calls == []
    with pytest.raises(ValueError, match="one index per text"):
        extractor.activations_at(texts, [1, 2])


def test_progress_bars_have_a_total_and_reach_it(capsys):
    # The texts are known up front: the bars count their characters (texts differ in
    # length, so a count of texts would give a wrong ETA) and end at 100%.
    texts = ["the quick brown fox " * 20, "a lazy dog " * 5] * 3
    n_chars = sum(map(len, texts))
    extractor = ActivationExtractor(
        make_tiny_model("llama"), tokenizer=make_char_tokenizer(), layer=1, device="cpu",
        context_size=32, verbose=1,
    )  # fmt: skip
    X = extractor.transform(texts)
    sae = SparseAutoencoder(n_components=16, k=2, max_iter=1, device="cpu").fit(X)
    out = capsys.readouterr().out
    assert f"extracting: 100%|██████████| {n_chars / 1000:.2f}k/{n_chars / 1000:.2f}k" in out
    assert f"{X.shape[0]} tok" in out.rsplit("extracting:", 1)[1]  # the kept tokens
    loss_recovered(sae, extractor, texts)
    out = capsys.readouterr().out
    assert f"loss recovered: 100%|██████████| {n_chars / 1000:.2f}k/" in out


# ------------------------------------------------------------------ long texts


class RecordingTokenizer:
    """A tokenizer that records the longest text it was called with."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.longest = 0

    def __call__(self, text, *args, **kwargs):
        texts = [text] if isinstance(text, str) else text
        self.longest = max(self.longest, sum(map(len, texts)))
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("kind", ["char", "byte-level"])
def test_a_long_text_is_tokenised_in_bounded_pieces_into_the_same_rows(kind, monkeypatch):
    from conftest import BYTE_TEXTS, make_byte_level_tokenizer

    from skSAE import extraction

    if kind == "char":
        tokenizer = make_char_tokenizer()
        long = "the quick brown fox jumps over the lazy dog, twice.  " * 40
    else:
        tokenizer = make_byte_level_tokenizer()
        long = "".join(BYTE_TEXTS)
    texts = ["a short text.", long, "another short one, after it."]
    model = make_tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=32)

    def extract(bound):
        monkeypatch.setattr(extraction, "_TOKENIZER_CHARS", bound, raising=False)
        recording = RecordingTokenizer(tokenizer)
        extractor = ActivationExtractor(
            model, tokenizer=recording, layer=1, context_size=32, batch_size=4, device="cpu"
        )
        return extractor.extract(texts), recording.longest

    whole, longest = extract(10**9)
    assert longest >= len(long) > 2000
    pieces, longest = extract(400)
    assert longest <= 400
    # The rows of every text, the long one included, are those of tokenising it whole.
    ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    rows = pieces.doc_index == 1
    np.testing.assert_array_equal(pieces.token_ids[rows], np.asarray(ids)[pieces.position[rows]])
    for name in whole._fields:
        np.testing.assert_array_equal(getattr(pieces, name), getattr(whole, name), err_msg=name)
