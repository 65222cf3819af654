"""The HDF5 store of an extraction: refusals, failed calls, kills, and empty results."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
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


# ------------------------------------------------------------- a disk that fills

MIB = 2**20
COLUMNS = ("activations", "token_ids", "doc_index", "position")
# 50 texts of 127 rows, each of 128 float32 and three int64. The store's first chunks
# hold 2,048 rows in 2.5 MiB, and every next 2,048 rows take 1 MiB more: 5.5 MiB in all.
FILLING_TEXTS = ["the quick brown fox jumps over the lazy dog, " * 3] * 50


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (a file system that fills), unmounted after; skipped where none mounts."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills) needs root on Linux")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command to mount a small tmpfs (a disk that fills)")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def leave_room(disk, room):
    """Fill ``disk`` with a file that leaves about ``room`` bytes free; returns the file.

    The room is counted beyond the space the store sets aside while it writes (its
    reserve), so the store itself gets about ``room``.
    """
    from skSAE import cache

    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler = disk / "filler"
    filler.write_bytes(b"\1" * (free - room - getattr(cache, "_RESERVE_BYTES", 0)))
    return filler


def filling_model():
    """A random 2-block Llama of width 128 (wide rows fill a disk in few forward passes)."""
    import transformers

    tokenizer = make_char_tokenizer()
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        vocab_size=len(tokenizer),
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval(), tokenizer


def filling_extractor():
    model, tokenizer = filling_model()
    return ActivationExtractor(
        model,
        tokenizer=tokenizer,
        layer=1,
        context_size=32,
        batch_size=64,
        max_norm_ratio=None,
        device="cpu",
    )


@pytest.mark.parametrize("checked", [True, False], ids=["checked", "unforeseen"])
def test_a_disk_that_fills_gives_one_error_and_a_store_that_resumes(
    small_disk, checked, monkeypatch
):
    from skSAE import cache

    if not checked:  # as if another process took the room, or a quota ran out: HDF5 fails
        monkeypatch.setattr(cache._StoreWriter, "_check_room", lambda self, n_rows: None)
    extractor = filling_extractor()
    texts = FILLING_TEXTS
    whole = extractor.extract(texts)
    store = small_disk / "acts.h5"
    # Room for the store's first chunks, and (checked) room for a few more rows that the
    # check's margin keeps; not for all.
    filler = leave_room(small_disk, (4 if checked else 3) * MIB)
    with pytest.raises(OSError, match="No space left on device") as raised:
        extractor.extract(texts, store=store)
    message = str(raised.value)
    assert str(store) in message and "the file system refused a write" in message
    assert raised.value.errno == 28  # ENOSPC
    with h5py.File(store, "r") as file:
        assert not file.attrs["complete"]
        done = int(file.attrs["documents_done"])
        stored = {name: file[name][:] for name in COLUMNS}
        assert file.attrs["rows_done"] == stored["activations"].shape[0]
    assert f"holds {done} of {len(texts)} texts" in message
    assert 0 < done < len(texts)
    # The rows the store holds are real rows, those of the uninterrupted extraction,
    # every text before `done` whole among them.
    n_rows = stored["activations"].shape[0]
    assert np.count_nonzero(whole.doc_index < done) <= n_rows < len(whole.doc_index)
    assert (np.abs(stored["activations"]).sum(axis=1) > 0).all()
    np.testing.assert_allclose(stored["activations"], whole.activations[:n_rows], atol=1e-6)
    for name in COLUMNS[1:]:
        np.testing.assert_array_equal(stored[name], getattr(whole, name)[:n_rows], err_msg=name)
    assert sorted(path.name for path in small_disk.iterdir()) == ["acts.h5", "filler"]

    filler.unlink()  # room again: the same call finishes the store
    resumed = extractor.extract(texts, store=store)
    assert resumed.attrs["complete"]
    got = resumed.read()
    np.testing.assert_allclose(got.activations, whole.activations, rtol=1e-5, atol=1e-6)
    for name in COLUMNS[1:]:
        np.testing.assert_array_equal(getattr(got, name), getattr(whole, name), err_msg=name)


def test_a_disk_full_at_the_first_rows_leaves_no_file(small_disk):
    extractor = filling_extractor()
    store = small_disk / "acts.h5"
    leave_room(small_disk, MIB // 2)  # less than the store's first chunks
    with pytest.raises(OSError, match="No space left on device.*Nothing was written"):
        extractor.extract(FILLING_TEXTS, store=store)
    assert sorted(path.name for path in small_disk.iterdir()) == ["filler"]


FILLING_RUN = """
import sys
from skSAE import cli

sys.exit(cli.main(sys.argv[1:]))
"""


def test_extract_command_on_a_full_disk_exits_in_one_line_and_train_refuses(small_disk, tmp_path):
    from skSAE import cli

    folder = tmp_path / "model"
    model, tokenizer = filling_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "texts.txt").write_text("\n".join(FILLING_TEXTS) + "\n")
    store = small_disk / "acts.h5"
    leave_room(small_disk, 4 * MIB)
    args = [
        "extract", "--model", folder, "--texts", tmp_path / "texts.txt", "--store", store,
        "--layer", "1", "--context-size", "32", "--extract-batch-size", "64",
        "--device", "cpu", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, "-c", FILLING_RUN, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # One line on stderr, exit status 1: no ignored exceptions from HDF5's clean-up,
    # no crash at the interpreter's exit (a negative status is a signal).
    assert "Exception ignored" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith(f"skSAE extract: error: {store}: the file system refused")
    assert "No space left on device" in lines[0] and "run the same" in lines[0]
    output = tmp_path / "sae"
    status = cli.main(["train", "--store", str(store), "--output", str(output), "--quiet"])
    assert status == 1 and not output.exists()


def test_an_unfinished_store_is_refused_for_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from skSAE import SparseAutoencoder, cli
    from skSAE.cache import StoredRows

    original = ActivationExtractor.iter_batches

    def interrupted(self, texts, first_document=0):
        for count, batch in enumerate(original(self, texts, first_document)):
            if count == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(ActivationExtractor, "iter_batches", interrupted)
    store = tmp_path / "acts.h5"
    with pytest.raises(KeyboardInterrupt):
        extractor_for(tiny_model_dir).extract(TEXTS * 3, store=store)
    cache = ActivationCache(store)
    assert not cache.attrs["complete"] and cache.n_rows > 0
    unfinished = rf"{store} is an unfinished store \(\d+ of 12 texts\)"
    with pytest.raises(ValueError, match=unfinished):
        cache.rows()
    with pytest.raises(ValueError, match=unfinished):
        StoredRows(store)
    with pytest.raises(ValueError, match=unfinished), cache.open() as file:
        SparseAutoencoder(n_components=8, k=2, max_iter=1).fit(file["activations"])
    output = tmp_path / "sae"
    status = cli.main(["train", "--store", str(store), "--output", str(output), "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and not output.exists()
    assert "unfinished" in err and "skSAE extract" in err


# ------------------------------------------------------------- loaded model objects


def test_two_model_objects_of_one_class_never_share_a_store(tmp_path):
    import copy

    tokenizer = make_char_tokenizer()
    model_a = make_tiny_model("llama", vocab_size=len(tokenizer))
    model_b = make_tiny_model("llama", vocab_size=len(tokenizer))
    with torch.no_grad():
        model_b.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # other weights, same class
    assert model_a.config.name_or_path == model_b.config.name_or_path

    def extractor(model):
        return ActivationExtractor(
            model, tokenizer=tokenizer, layer=1, context_size=16, batch_size=3, device="cpu"
        )

    store = tmp_path / "acts.h5"
    rows_a = extractor(model_a).extract(TEXTS, store=store).read()
    assert extractor(model_b).extraction_key() != extractor(model_a).extraction_key()
    with pytest.raises(ValueError, match=r"differs in \['model'\].*LlamaForCausalLM \(weights"):
        extractor(model_b).extract(TEXTS, store=store)
    rows_b = extractor(model_b).extract(TEXTS, store=tmp_path / "b.h5").read()
    assert not np.allclose(rows_b.activations, rows_a.activations)
    # The same weights in another object are the same model: its store is reused.
    same = extractor(copy.deepcopy(model_a)).extract(TEXTS, store=store).read()
    assert_same_rows(same, rows_a)


def test_a_model_object_keeps_its_key_when_loading_casts_it(tmp_path):
    # load() casts a model object to `dtype` in place: the key must not change with it,
    # or the store written before the cast would be refused when resumed after it.
    tokenizer = make_char_tokenizer()
    extractor = ActivationExtractor(
        make_tiny_model("gpt2", vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        layer=1,
        dtype="bfloat16",
        device="cpu",
    )
    key = extractor.extraction_key()
    extractor.load()
    assert next(extractor.model_.parameters()).dtype == torch.bfloat16
    assert extractor.extraction_key() == key
