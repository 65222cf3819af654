"""The HDF5 store of an extraction: refusals, failed calls, kills, and empty results."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import TEXTS, make_char_tokenizer, make_tiny_model

from skSAE import ActivationCache, ActivationExtractor


def extractor_for(folder, **params):
    params = {"layer": 1, "context_size": 16, "batch_size": 3, "device": "cpu", **params}
    return ActivationExtractor(str(folder), **params)


def assert_same_rows(got, want):
    for name in want._fields:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def test_store_of_another_tokenizer_is_refused_naming_it(tiny_model_dir, tmp_path):
    # The same model folder with a tokenizer that prepends <bos>: other tokenisations.
    bos_tokenizer = tmp_path / "bos-tokenizer"
    make_char_tokenizer(add_bos=True).save_pretrained(bos_tokenizer)
    store = tmp_path / "acts.h5"
    extractor_for(tiny_model_dir, exclude_special_tokens=False).extract(TEXTS, store=store)
    other = extractor_for(tiny_model_dir, exclude_special_tokens=False, tokenizer=bos_tokenizer)
    with pytest.raises(ValueError, match=r"differs in \['tokenizer'\].*bos-tokenizer"):
        other.extract(TEXTS, store=store)


def test_store_attrs_hold_the_extraction_key_readably(tiny_model_dir, tmp_path):
    extractor = extractor_for(tiny_model_dir)
    attrs = extractor.extract(TEXTS, store=tmp_path / "acts.h5").attrs
    for name, value in extractor.extraction_key().items():
        assert attrs[name] == value, name
    assert attrs["model"].startswith(f"{Path(tiny_model_dir).name} (sha256 ")
    assert attrs["tokenizer"] == "the model's"
    assert attrs["n_texts"] == len(TEXTS) and attrs["complete"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"layer": 7}, r"layer=7 is out of range"),
        ({"hook": "model.nope"}, r"hook='model.nope'"),
    ],
)
def test_failed_extraction_leaves_its_store_path_usable(tiny_model_dir, tmp_path, bad, message):
    store = tmp_path / "acts.h5"
    with pytest.raises(ValueError, match=message):
        extractor_for(tiny_model_dir, **bad).extract(TEXTS, store=store)
    assert not store.exists()
    cache = extractor_for(tiny_model_dir).extract(TEXTS, store=store)
    assert_same_rows(cache.read(), extractor_for(tiny_model_dir).extract(TEXTS))


def test_context_too_small_for_the_template_writes_nothing(tmp_path):
    from tokenizers import processors

    make_tiny_model("llama").save_pretrained(tmp_path / "model")
    tokenizer = make_char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    tokenizer.save_pretrained(tmp_path / "model")
    store = tmp_path / "acts.h5"
    # <bos> and <eos> fill both positions of a context of 2: no room for text.
    extractor = ActivationExtractor(str(tmp_path / "model"), context_size=2, layer=1, device="cpu")
    with pytest.raises(ValueError, match="context_size=2 leaves no room"):
        extractor.extract(TEXTS, store=store)
    assert not store.exists()
    extractor.set_params(context_size=16).extract(TEXTS, store=store)
    assert ActivationCache(store).attrs["complete"]


def test_lone_surrogate_is_refused_naming_the_text(tiny_model_dir, tmp_path):
    texts = ["fine", "bad \ud800 x"]
    extractor = extractor_for(tiny_model_dir)
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode.*surrogate"):
        extractor.extract(texts)
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode"):
        extractor.extract(texts, store=tmp_path / "acts.h5")
    assert not (tmp_path / "acts.h5").exists()


@pytest.mark.parametrize("texts", [[""], ["a"], ["a", ""]])
def test_no_kept_token_raises_in_memory_and_with_store(tiny_model_dir, tmp_path, texts):
    # "" has no token; "a" has one, its context's first position, which is dropped.
    extractor = extractor_for(tiny_model_dir)
    with pytest.raises(ValueError, match="No token was kept"):
        extractor.extract(texts)
    with pytest.raises(ValueError, match="No token was kept"):
        extractor.extract(texts, store=tmp_path / "acts.h5")
    assert not (tmp_path / "acts.h5").exists()


KILLED_RUN = """
import os, signal, sys
import skSAE.cache as cache
from skSAE import ActivationExtractor

folder, store, texts = sys.argv[1], sys.argv[2], sys.argv[3:]
original = cache._create_datasets


def create_then_die(file, d_model):
    # The worst moment: the file exists, its datasets are created, nothing is flushed.
    original(file, d_model)
    os.kill(os.getpid(), signal.SIGKILL)


cache._create_datasets = create_then_die
ActivationExtractor(folder, layer=1, context_size=16, batch_size=3, device="cpu").extract(
    texts, store=store
)
"""


def test_store_killed_before_its_first_flush_resumes(tmp_path):
    folder = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    store = tmp_path / "acts.h5"
    texts = TEXTS * 2
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(folder), str(store)] + texts,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    resumed = extractor_for(folder).extract(texts, store=store)
    assert resumed.attrs["complete"]
    assert_same_rows(resumed.read(), extractor_for(folder).extract(texts))


def test_store_appears_only_once_it_holds_rows(tiny_model_dir, tmp_path, monkeypatch):
    store = tmp_path / "acts.h5"
    extractor = extractor_for(tiny_model_dir)
    seen = []
    original = ActivationExtractor.iter_batches

    def watching(self, texts, first_document=0):
        for batch in original(self, texts, first_document):
            seen.append(store.exists())
            yield batch

    monkeypatch.setattr(ActivationExtractor, "iter_batches", watching)
    extractor.extract(TEXTS, store=store)
    # Absent while the first batch is computed (settings still unchecked by a forward
    # pass), present once it holds rows; no temporary file is left behind.
    assert seen[0] is False and all(seen[1:])
    assert ActivationCache(store).n_rows > 0
    assert not list(tmp_path.glob("*.partial"))


def test_store_of_another_max_norm_ratio_is_refused(tiny_model_dir, tmp_path):
    store = tmp_path / "acts.h5"
    cache = extractor_for(tiny_model_dir, max_norm_ratio=None).extract(TEXTS, store=store)
    assert cache.attrs["max_norm_ratio"] == float("inf")
    with pytest.raises(ValueError, match=r"differs in \['max_norm_ratio'\]"):
        extractor_for(tiny_model_dir).extract(TEXTS, store=store)


def test_store_with_max_norm_ratio_equals_in_memory(tiny_model_dir, tmp_path):
    extractor = extractor_for(tiny_model_dir, max_norm_ratio=1.2)
    stored = extractor.extract(TEXTS * 2, store=tmp_path / "acts.h5").read()
    assert_same_rows(stored, extractor.extract(TEXTS * 2))
