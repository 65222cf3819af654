"""skSAE.io: our own format, and the files of SAELens, sparsify and dictionary_learning.

Each foreign layout is built here with `safetensors` or `torch.save`, exactly as its
library writes it, and the loaded model's codes are compared with that library's
formula written out in float64 (not with our folding): codes equal the original's
times the decoder row norms, reconstructions equal the original's.
"""

import errno
import json
import os
import shutil
import subprocess
import threading

import numpy as np
import pytest
import torch
from conftest import (
    TEXTS,
    assert_codes_agree,
    code_activation,
    encoder_pre_activations,
    undecided_codes,
)
from safetensors.numpy import load_file, save_file
from sklearn.base import clone

from skSAE import ActivationExtractor, SparseAutoencoder, io
from skSAE._architectures import ARCHITECTURES
from skSAE._hook_names import extractor_hook, transformer_lens_name
from skSAE.interpret import generate_with_steering, write_dashboard
from skSAE.io import FormatError
from skSAE.metrics import loss_recovered

D, F, K = 12, 40, 5
RTOL, ATOL = 1e-5, 1e-5


def fitted(architecture, **params):
    X = np.random.default_rng(0).normal(size=(512, D)).astype(np.float32)
    if ARCHITECTURES[architecture].coefficient_name is None:
        params.setdefault("k", K)
    else:
        params.setdefault("target_l0", K)
    sae = SparseAutoencoder(
        n_components=F, architecture=architecture, max_iter=2, random_state=0, **params
    ).fit(X)
    return sae, X


def inputs(seed=1, n=300):
    return np.random.default_rng(seed).normal(size=(n, D))


def weights(seed=0, unit=False):
    """Random float32 weights with decoder row norms between 0.5 and 2 (or unit)."""
    rng = np.random.default_rng(seed)
    W_enc = rng.normal(size=(D, F)) / np.sqrt(D)
    W_dec = rng.normal(size=(F, D))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    if not unit:
        W_dec *= rng.uniform(0.5, 2.0, size=(F, 1))
    b_enc = rng.normal(size=F) * 0.1
    b_dec = rng.normal(size=D) * 0.3
    return [w.astype(np.float32) for w in (W_enc, b_enc, W_dec, b_dec)]


def f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def topk_rows(pre, k):
    """Keep the k largest entries of each row, ReLU applied (as every library does)."""
    out = np.zeros_like(pre)
    index = np.argsort(-pre, axis=1)[:, :k]
    rows = np.arange(pre.shape[0])[:, None]
    out[rows, index] = np.maximum(pre[rows, index], 0)
    return out


def check_equivalent(sae, X, codes, W_dec, b_dec):
    """Our codes are theirs times the row norms; our reconstructions are theirs.

    A code within rounding of its cut (float32, and the fold into our form: ATOL) may
    fall either way, so it and its row's reconstruction are left out.
    """
    norm = np.linalg.norm(W_dec, axis=1)
    ours = sae.transform(X.astype(np.float32)).astype(np.float64)
    pre, bound = encoder_pre_activations(sae, X)
    undecided = undecided_codes(pre, bound + ATOL, **code_activation(sae))
    theirs = codes * norm
    assert_codes_agree(ours, theirs, undecided, RTOL * np.abs(theirs) + ATOL)
    np.testing.assert_array_equal((ours > 0)[~undecided], (theirs > 0)[~undecided])
    decided = ~undecided.any(axis=1)
    np.testing.assert_allclose(
        sae.inverse_transform(ours.astype(np.float32))[decided],
        (codes @ W_dec + b_dec)[decided],
        rtol=RTOL,
        atol=1e-4,
    )
    np.testing.assert_allclose(np.linalg.norm(sae.components_, axis=1), 1, atol=1e-6)


# ----------------------------------------------------------------- own format


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_own_format_round_trips_exactly(architecture, tmp_path):
    sae, X = fitted(architecture)
    io.save(sae, tmp_path / "m", model_name="tiny", hook_name="blocks.1.hook_resid_post")
    loaded = io.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.transform(X), sae.transform(X))
    np.testing.assert_array_equal(
        loaded.inverse_transform(sae.transform(X)), sae.inverse_transform(sae.transform(X))
    )
    assert loaded.get_params() == sae.get_params()
    for name in (
        "input_scale_",
        "n_steps_",
        "n_iter_",
        "batch_size_",
        "learning_rate_",
        "loss_curve_",
        "dead_fraction_",
    ):
        assert getattr(loaded, name) == getattr(sae, name), name
    np.testing.assert_array_equal(loaded.latent_frequency_, sae.latent_frequency_)
    assert loaded.metadata_ == {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"}
    assert loaded.score(X) == sae.score(X)
    # No pickle: a JSON config and a safetensors file.
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "skSAE" and config["architecture"] == architecture
    assert set(load_file(tmp_path / "m" / "model.safetensors")) >= {"W_enc_", "components_"}


def test_own_format_continues_training_like_the_original(tmp_path):
    sae, X = fitted("relu")
    io.save(sae, tmp_path / "m")
    loaded = io.load(tmp_path / "m")
    # Both continue with a fresh Adam state (an unpickled model does too).
    reference = clone(sae)
    reference.__setstate__(sae.__getstate__())
    reference.partial_fit(X)
    loaded.partial_fit(X)
    for name in ("W_enc_", "b_enc_", "components_", "b_dec_", "threshold_", "_rows_since_fired"):
        if hasattr(reference, name):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(reference, name), name)
    assert loaded.n_steps_ == reference.n_steps_ > sae.n_steps_
    assert loaded.sparsity_coefficient_ == reference.sparsity_coefficient_


def test_own_format_keeps_feature_names(tmp_path):
    pandas = pytest.importorskip("pandas")
    X = pandas.DataFrame(inputs().astype(np.float32), columns=[f"c{i}" for i in range(D)])
    sae = SparseAutoencoder(n_components=F, k=K, max_iter=1, random_state=0).fit(X)
    io.save(sae, tmp_path / "m")
    loaded = io.load(tmp_path / "m")
    assert list(loaded.feature_names_in_) == list(X.columns)
    np.testing.assert_array_equal(loaded.transform(X), sae.transform(X))


def test_newer_format_version_is_refused(tmp_path):
    sae, _ = fitted("topk")
    io.save(sae, tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["format_version"] = io.FORMAT_VERSION + 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(FormatError, match="format_version 2.*Upgrade skSAE"):
        io.load(tmp_path / "m")


def test_own_format_loads_without_the_saved_device(tmp_path):
    sae, X = fitted("topk")
    io.save(sae.set_params(device="cuda:7"), tmp_path / "m")  # a device this machine lacks
    with pytest.warns(UserWarning, match="device='cuda:7'.*loaded with device='auto'"):
        loaded = io.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.transform(X), sae.set_params(device="cpu").transform(X))


def test_save_refuses_to_overwrite_and_replaces_only_when_asked(tmp_path):
    sae, X = fitted("topk")
    other, _ = fitted("relu")
    io.save(sae, tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.save(other, tmp_path / "m")
    np.testing.assert_array_equal(io.load(tmp_path / "m").transform(X), sae.transform(X))
    # A failed save (metadata that is not JSON) leaves the existing folder as it was.
    with pytest.raises(ValueError, match="metadata 'bad' is not a JSON value"):
        io.save(other, tmp_path / "m", overwrite=True, bad=object())
    np.testing.assert_array_equal(io.load(tmp_path / "m").transform(X), sae.transform(X))
    io.save(other, tmp_path / "m", overwrite=True)
    assert io.load(tmp_path / "m").architecture == "relu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no scratch folders left
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        io.save(sae, tmp_path / "file")
    # overwrite=True never replaces a folder of other files.
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not an SAE"):
        io.save(sae, tmp_path / "work", overwrite=True)
    assert (tmp_path / "work" / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("failing_rename", [2, 3, 4, 5])
def test_save_that_fails_midway_keeps_the_old_folder(failing_rename, tmp_path, monkeypatch):
    sae, X = fitted("topk")
    other, _ = fitted("relu")
    io.save(sae, tmp_path / "m")
    real_rename = os.rename
    calls = []

    def rename_then_fail(source, target):
        # 1: the claim of the folder (refused: it exists); 2, 3: the old config and
        # weights move aside; 4, 5: the new weights and config move in.
        calls.append((source, target))
        if len(calls) == failing_rename:
            raise OSError("the device went away")
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename_then_fail)
    with pytest.raises(OSError, match="the device went away"):
        io.save(other, tmp_path / "m", overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(io.load(tmp_path / "m").transform(X), sae.transform(X))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


@pytest.fixture(scope="module")
def two_models():
    """Two different fitted models (topk and relu) and their data."""
    sae, X = fitted("topk")
    other, _ = fitted("relu")
    return sae, other, X


def test_overwrite_replaces_only_the_sae_files(two_models, tmp_path):
    sae, other, X = two_models
    folder = tmp_path / "m"
    io.save(sae, folder)
    (folder / "notes.md").write_text("what I tried")
    (folder / "runs").mkdir()
    (folder / "runs" / "events").write_text("logs")
    io.save(other, folder, overwrite=True)
    np.testing.assert_array_equal(io.load(folder).transform(X), other.transform(X))
    assert (folder / "notes.md").read_text() == "what I tried"
    assert (folder / "runs" / "events").read_text() == "logs"
    # In another format, the old format's files go and the user's stay.
    io.save(sae, folder, format="saelens", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json",
        "notes.md",
        "runs",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    np.testing.assert_allclose(io.load(folder).transform(X), sae.transform(X), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no scratch folder left
    # Another library's SAE is not one save writes: its config.json would be lost.
    theirs = dl_folder(tmp_path / "dl", "AutoEncoder", {"bias": torch.zeros(D)})
    with pytest.raises(FileExistsError, match="holds a dictionary_learning SAE"):
        io.save(sae, theirs, overwrite=True)
    assert sorted(p.name for p in theirs.iterdir()) == ["ae.pt", "config.json"]


def test_two_saves_to_one_new_folder_one_wins(two_models, tmp_path, monkeypatch):
    sae, other, X = two_models
    both_written = threading.Barrier(2, timeout=120)
    write_own = io._write_own

    def write_then_wait(*args):
        write_own(*args)
        # Both saves have found the folder free and written their files: each moves
        # them in only now, so the race is the same on every run.
        both_written.wait()

    monkeypatch.setattr(io, "_write_own", write_then_wait)
    outcomes = {}

    def save(name, model):
        try:
            io.save(model, tmp_path / "m")
            outcomes[name] = "saved"
        except FileExistsError as exc:
            outcomes[name] = str(exc)

    threads = [threading.Thread(target=save, args=args) for args in (("a", sae), ("b", other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(outcomes) == ["a", "b"]
    assert list(outcomes.values()).count("saved") == 1, outcomes
    lost = next(value for value in outcomes.values() if value != "saved")
    assert "was written by another process while this save was writing" in lost
    winner = sae if outcomes["a"] == "saved" else other
    np.testing.assert_array_equal(io.load(tmp_path / "m").transform(X), winner.transform(X))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_overwriting_saves_wait_for_the_folder_lock(two_models, tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl", reason="the lock is flock, which this system lacks")
    sae, other, X = two_models
    io.save(sae, tmp_path / "m")
    written = threading.Event()
    write_own = io._write_own

    def write_and_say(*args):
        write_own(*args)
        written.set()

    monkeypatch.setattr(io, "_write_own", write_and_say)
    descriptor = os.open(tmp_path / "m", os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)  # as another overwriting save holds it
    thread = threading.Thread(
        target=io.save, args=(other, tmp_path / "m"), kwargs={"overwrite": True}
    )
    thread.start()
    try:
        assert written.wait(120)
        thread.join(0.5)
        assert thread.is_alive()  # waiting for the lock, the folder untouched
        np.testing.assert_array_equal(io.load(tmp_path / "m").transform(X), sae.transform(X))
    finally:
        os.close(descriptor)
        thread.join(120)
    np.testing.assert_array_equal(io.load(tmp_path / "m").transform(X), other.transform(X))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs to fill (mounting one needs root), unmounted afterwards."""
    if getattr(os, "geteuid", lambda: -1)() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root and mount")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", os.fspath(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"could not mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", os.fspath(disk)], check=True)


def free_bytes(folder):
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


@pytest.mark.parametrize("full_at", ["weights", "config"])
@pytest.mark.parametrize("previous_save", [False, True])
def test_save_on_a_full_disk_says_so_and_keeps_the_previous_save(
    full_at, previous_save, small_disk, two_models, tmp_path
):
    sae, other, X = two_models
    target = small_disk / "m"
    if previous_save:
        io.save(sae, target)
    # tmpfs allocates whole pages: leave none, or just enough for the new weights.
    io.save(other, tmp_path / "measured")
    page = os.statvfs(small_disk).f_frsize
    weights_pages = -(-(tmp_path / "measured" / "model.safetensors").stat().st_size // page)
    leave = 0 if full_at == "weights" else weights_pages * page
    with open(small_disk / "filler", "wb") as file:
        file.write(bytes(free_bytes(small_disk) - leave))
    assert free_bytes(small_disk) == leave
    with pytest.raises(OSError) as raised:
        io.save(other, target, overwrite=previous_save)
    assert raised.value.errno == errno.ENOSPC
    assert f"No space left on the disk of {small_disk} to save 'm'" in str(raised.value)
    assert f"{target} is as it was" in str(raised.value)
    # Nothing half-written is left, and the previous save loads as it was.
    expected = ["filler", "m"] if previous_save else ["filler"]
    assert sorted(p.name for p in small_disk.iterdir()) == expected
    assert free_bytes(small_disk) == leave
    if previous_save:
        assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
        np.testing.assert_array_equal(io.load(target).transform(X), sae.transform(X))


def test_saved_folder_is_readable_by_others(tmp_path):
    sae, _ = fitted("topk")
    io.save(sae, tmp_path / "m")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask


def test_numpy_scalar_parameters_are_saved_as_numbers(tmp_path):
    X = inputs().astype(np.float32)
    sae = SparseAutoencoder(n_components=F, k=np.int64(K), max_iter=1, random_state=np.int64(3))
    sae.fit(X)
    io.save(sae, tmp_path / "m")
    loaded = io.load(tmp_path / "m")
    assert (loaded.k, loaded.random_state) == (K, 3)


def test_save_rejects_unfitted_and_unknown_format(tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        io.save(SparseAutoencoder(), tmp_path / "m")
    sae, _ = fitted("topk")
    with pytest.raises(ValueError, match="format must be one of"):
        io.save(sae, tmp_path / "m", format="sparsify")


def test_bad_files_get_clear_errors(tmp_path):
    sae, _ = fitted("topk")
    io.save(sae, tmp_path / "m")
    folder = tmp_path / "m"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.load(tmp_path / "missing")
    with pytest.raises(FormatError, match="is a file; load expects the folder"):
        io.load(folder / "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="holds no SAE skSAE recognises"):
        io.load(empty)
    # A truncated safetensors file.
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(FormatError, match="model.safetensors is not a readable safetensors"):
        io.load(folder)
    (folder / "model.safetensors").write_bytes(weights)
    # A JSON file that is not an object.
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="config.json must hold a JSON object, got a list"):
        io.load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="config.json is not valid JSON"):
        io.load(folder)
    (folder / "config.json").write_text(config)
    # A missing tensor and a wrong shape.
    arrays = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in arrays.items() if k != "b_dec_"}, folder / "model.safetensors")
    with pytest.raises(FormatError, match="model.safetensors has no tensor 'b_dec_'"):
        io.load(folder)
    save_file({**arrays, "b_enc_": arrays["b_enc_"][:-1]}, folder / "model.safetensors")
    with pytest.raises(FormatError, match=r"'b_enc_' has shape \(39,\), expected \(40,\)"):
        io.load(folder)
    save_file({**arrays, "input_mean_": arrays["input_mean_"][:3]}, folder / "model.safetensors")
    with pytest.raises(FormatError, match=r"'input_mean_' has shape \(3,\), expected \(12,\)"):
        io.load(folder)
    save_file(arrays, folder / "model.safetensors")
    edited = json.loads(config)
    edited["attributes"]["n_features_in_"] = 7
    (folder / "config.json").write_text(json.dumps(edited))
    with pytest.raises(FormatError, match=r"names \['n_features_in_'\]"):
        io.load(folder)


@pytest.fixture(scope="module")
def good_folders(tmp_path_factory):
    """A saved topk model (k, random state, counters) and a jumprelu one (threshold_)."""
    root = tmp_path_factory.mktemp("good")
    for architecture in ("topk", "jumprelu"):
        io.save(fitted(architecture)[0], root / architecture)
    return root


DELETE = object()


# (architecture, field of config.json as a dotted path, bad value, what the error says)
BAD_CONFIG_FIELDS = [
    ("topk", "fit_options.k", -5, r"'fit_options.k': The 'k' parameter .* Got -5 instead"),
    ("topk", "fit_options.k", 0, r"'fit_options.k': .*an int in the range \[1, inf\)\. Got 0"),
    ("topk", "fit_options.k", 2.9, r"'fit_options.k': .*must be an int.* Got 2.9 instead"),
    ("topk", "fit_options.kk", 3, "'fit_options.kk' is not a SparseAutoencoder parameter"),
    ("topk", "params.k", -5, r"'params.k': The 'k' parameter .* Got -5 instead"),
    ("topk", "architecture", "nope", r"'architecture': .* Got 'nope' instead"),
    ("topk", "attributes.input_scale_", "x", "'attributes.input_scale_' is 'x', expected a pos"),
    ("topk", "attributes.input_scale_", -1.0, "'attributes.input_scale_' is -1.0, expected a p"),
    ("topk", "attributes.input_scale_", float("nan"), "'attributes.input_scale_' is nan, expe"),
    ("topk", "attributes.loss_curve_", 5, "'attributes.loss_curve_' is 5, expected a list of f"),
    ("topk", "attributes.loss_curve_", ["a"], r"'attributes.loss_curve_' is \['a'\], expected"),
    ("topk", "attributes.n_iter_", -1, "'attributes.n_iter_' is -1, expected an integer >= 0"),
    ("topk", "attributes.n_steps_", 2.5, "'attributes.n_steps_' is 2.5, expected an integer"),
    ("topk", "attributes.batch_size_", 0, "'attributes.batch_size_' is 0, expected a positive"),
    ("topk", "attributes.learning_rate_", -0.001, "'attributes.learning_rate_' is -0.001, ex"),
    ("topk", "attributes.dead_fraction_", 2.0, r"'attributes.dead_fraction_' is 2.0, .*\[0, 1\]"),
    ("topk", "attributes.warmup_steps_", True, "'attributes.warmup_steps_' is True, expected"),
    ("topk", "attributes.feature_names_in_", ["a"], "'attributes.feature_names_in_' is .*12 str"),
    ("jumprelu", "attributes.sparsity_coefficient_", "x", "'attributes.sparsity_coefficient_'"),
    ("topk", "training_state", 5, "'training_state' is 5, expected an object"),
    ("topk", "training_state.random_position", 9999, r"'training_state.random_position' is 9999"),
    ("topk", "training_state.random_has_gauss", None, "'training_state.random_has_gauss' is No"),
    ("topk", "training_state.random_cached_gaussian", "x", "'training_state.random_cached_gau"),
    ("topk", "training_state.rows_seen", -4, "'training_state.rows_seen' is -4, expected an int"),
    ("topk", "training_state.rows_seen", DELETE, r"'training_state' has the fields \['random_c"),
    ("topk", "scale_from_data", "no", "'scale_from_data' is 'no', expected true or false"),
    ("topk", "versions", 5, "'versions' is 5, expected an object of version strings"),
    ("topk", "metadata", [1], r"'metadata' is \[1\], expected an object"),
]


@pytest.mark.parametrize("architecture, field, value, message", BAD_CONFIG_FIELDS)
def test_load_refuses_a_bad_config_field(
    architecture, field, value, message, good_folders, tmp_path
):
    folder = shutil.copytree(good_folders / architecture, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    *parents, name = field.split(".")
    place = config
    for parent in parents:
        place = place[parent]
    # A field of the file is corrupted, or one that it may hold is added.
    assert name in place or field in ("fit_options.kk", "attributes.feature_names_in_")
    if value is DELETE:
        del place[name]
    else:
        place[name] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=f"config.json: field {message}"):
        io.load(folder)


# (architecture, tensor of model.safetensors, how it is corrupted, what the error says)
BAD_TENSORS = [
    ("topk", "latent_frequency_", lambda v: v * np.nan, ": tensor 'latent_frequency_' holds NaN"),
    (
        "topk",
        "latent_frequency_",
        lambda v: v + 1.5,
        r": tensor 'latent_frequency_' holds va.*\[0, 1",
    ),
    ("topk", "input_mean_", lambda v: v + np.inf, ": tensor 'input_mean_' holds NaN or infinite"),
    ("topk", "training.random_keys", lambda v: v[:10], r": tensor 'training.random_keys' has sh"),
    (
        "topk",
        "training.random_keys",
        lambda v: v + 0.5,
        r": tensor 'training.random_keys' .*integers",
    ),
    (
        "topk",
        "training.rows_since_fired",
        lambda v: -v - 1,
        r": tensor 'training.rows_since_fired' .*>= 0",
    ),
    ("topk", "W_enc_", lambda v: v[0], r": tensor 'W_enc_' has shape \(40,\), expected \(n_fe"),
    (
        "jumprelu",
        "threshold_",
        lambda v: v[:3],
        r": tensor 'threshold_' has shape \(3,\), expected \(\)",
    ),
    ("topk", "surplus", lambda v: np.zeros(3), r" holds tensors \['surplus'\], which skSAE does"),
]


@pytest.mark.parametrize("architecture, name, corrupt, message", BAD_TENSORS)
def test_load_refuses_a_bad_tensor(architecture, name, corrupt, message, good_folders, tmp_path):
    folder = shutil.copytree(good_folders / architecture, tmp_path / "m")
    arrays = load_file(folder / "model.safetensors")
    original = arrays.get(name, arrays["b_dec_"])
    assert name in arrays or name == "surplus"
    arrays[name] = np.ascontiguousarray(corrupt(original.astype(np.float64)))
    save_file(arrays, folder / "model.safetensors")
    with pytest.raises(FormatError, match=f"model.safetensors{message}"):
        io.load(folder)


def test_every_saved_attribute_is_checked_at_load():
    from skSAE._estimator import SAVED_ATTRIBUTES

    assert set(io._ATTRIBUTE_CHECKS) == set(SAVED_ATTRIBUTES)


def test_deeply_nested_json_is_a_format_error(good_folders, tmp_path):
    folder = shutil.copytree(good_folders / "topk", tmp_path / "m")
    depth = 100_000
    (folder / "config.json").write_text('{"metadata": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(FormatError, match="config.json nests its JSON values too deeply"):
        io.load(folder)


# ---------------------------------------------------------------------- SAELens


def saelens_folder(path, architecture, tensors, apply_b_dec=True, **fields):
    path.mkdir()
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
        path / "sae_weights.safetensors",
    )
    config = {
        "architecture": architecture,
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "hook_name": "blocks.2.hook_resid_post",
            "model_name": "tiny",
            "context_size": 32,
        },
        **fields,
    }
    (path / "cfg.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("architecture", ["standard", "topk", "topk-rescaled", "jumprelu", "gated"])
def test_saelens_files_load_with_their_codes(architecture, apply_b_dec, tmp_path):
    unit = architecture == "topk"  # selection on unscaled pre-activations needs unit rows
    W_enc, b_enc, W_dec, b_dec = weights(unit=unit)
    rng = np.random.default_rng(5)
    name = architecture.split("-")[0]
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec}
    fields = {}
    if name == "gated":
        tensors.update(b_gate=b_enc, b_mag=rng.normal(size=F) * 0.1, r_mag=rng.normal(size=F) * 0.3)
    else:
        tensors["b_enc"] = b_enc
    if name == "jumprelu":
        tensors["threshold"] = rng.uniform(-0.05, 0.3, size=F)
    if name == "topk":
        fields = {"k": K, "rescale_acts_by_decoder_norm": architecture == "topk-rescaled"}
    saelens_folder(tmp_path / "s", name, tensors, apply_b_dec, **fields)
    sae = io.load(tmp_path / "s")
    assert sae.architecture == {"standard": "relu"}.get(name, name)
    # SAELens's formula (saes/*.py), in float64 on the float32 weights.
    X = inputs()
    t = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in tensors.items()}
    x = X - t["b_dec"] * apply_b_dec
    if name == "gated":
        gate = (x @ t["W_enc"] + t["b_gate"]) > 0
        codes = gate * np.maximum(x @ (t["W_enc"] * np.exp(t["r_mag"])) + t["b_mag"], 0)
    else:
        pre = x @ t["W_enc"] + t["b_enc"]
        if name == "standard":
            codes = np.maximum(pre, 0)
        elif name == "jumprelu":
            codes = np.maximum(pre, 0) * (pre > t["threshold"])
        elif fields["rescale_acts_by_decoder_norm"]:
            norm = np.linalg.norm(t["W_dec"], axis=1)
            codes = topk_rows(pre * norm, K) / norm  # decoded as acts / norm @ W_dec
        else:
            codes = topk_rows(pre, K)
    check_equivalent(sae, X, codes, t["W_dec"], t["b_dec"])
    assert sae.metadata_["hook_name"] == "blocks.2.hook_resid_post"
    assert sae.metadata_["format"] == "saelens"


def test_saelens_sparsity_file_gives_latent_frequency(tmp_path):
    W_enc, b_enc, W_dec, b_dec = weights()
    folder = saelens_folder(
        tmp_path / "s", "standard", {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    )
    frequency = np.random.default_rng(0).uniform(0, 0.2, size=F)
    frequency[:3] = 0
    save_file(
        {"sparsity": np.log10(frequency + 1e-10).astype(np.float32)},
        folder / "sparsity.safetensors",
    )
    np.testing.assert_allclose(io.load(folder).latent_frequency_, frequency, rtol=1e-5, atol=1e-9)


def test_saelens_unfoldable_files_are_refused(tmp_path):
    W_enc, b_enc, W_dec, b_dec = weights()
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    folder = saelens_folder(tmp_path / "a", "topk", tensors, k=K)
    with pytest.raises(FormatError, match="decoder rows differ in norm"):
        io.load(folder)
    folder = saelens_folder(tmp_path / "b", "standard", tensors, normalize_activations="layer_norm")
    with pytest.raises(FormatError, match="normalize_activations='layer_norm'"):
        io.load(folder)
    folder = saelens_folder(tmp_path / "c", "transcoder", tensors)
    with pytest.raises(FormatError, match="architecture 'transcoder' is not one skSAE models"):
        io.load(folder)
    folder = saelens_folder(tmp_path / "d", "standard", {**tensors, "W_enc": W_enc[:-1]})
    with pytest.raises(FormatError, match=r"'W_enc' has shape \(11, 40\), expected \(12, 40\)"):
        io.load(folder)
    folder = saelens_folder(tmp_path / "e", "gated", tensors)
    with pytest.raises(FormatError, match="has no tensor 'b_gate'"):
        io.load(folder)


def test_saelens_expected_average_norm_is_folded_when_the_scale_is_given(tmp_path):
    W_enc, b_enc, W_dec, b_dec = f64(*weights())
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    folder = saelens_folder(
        tmp_path / "s", "standard", tensors, normalize_activations="expected_average_only_in"
    )
    with pytest.raises(FormatError, match="norm_scaling_factor="):
        io.load(folder)
    scale = 0.25
    sae = io.load(folder, norm_scaling_factor=scale)
    X = inputs() * 4
    t = {k: v.astype(np.float32).astype(np.float64) for k, v in tensors.items()}
    # SAELens: the SAE sees x * s and its output is divided by s.
    codes = np.maximum((X * scale - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0)
    check_equivalent(sae, X, codes, t["W_dec"] / scale, t["b_dec"] / scale)


def test_saelens_pre_6_config_is_read_with_its_defaults(tmp_path):
    W_enc, b_enc, W_dec, b_dec = weights(unit=True)
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
        folder / "sae_weights.safetensors",
    )
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "d_in": D,
                "d_sae": F,
                "activation_fn_str": "topk",  # the spelling SAELens wrote before 6.0
                "activation_fn_kwargs": {"k": K},
                "hook_point": "blocks.4.hook_mlp_out",
                "model_name": "gpt2",
            }
        )
    )
    sae = io.load(folder)
    assert (sae.architecture, sae.k) == ("topk", K)
    assert sae.metadata_["hook_name"] == "blocks.4.hook_mlp_out"
    x = inputs() - b_dec.astype(np.float64)  # apply_b_dec_to_input defaulted to true
    codes = topk_rows(x @ W_enc.astype(np.float64) + b_enc, K)
    check_equivalent(sae, inputs(), codes, W_dec.astype(np.float64), b_dec.astype(np.float64))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_saved_for_saelens_computes_our_codes(architecture, tmp_path):
    sae, X = fitted(architecture)
    io.save(sae, tmp_path / "s", format="saelens", hook_name="blocks.1.hook_resid_post")
    config = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert config["metadata"]["sae_lens_version"] == "6.0.0"
    assert config["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert config["normalize_activations"] == "none" and not config["apply_b_dec_to_input"]
    t = {
        k: v.astype(np.float64)
        for k, v in load_file(tmp_path / "s" / "sae_weights.safetensors").items()
    }
    x = X.astype(np.float64)
    name = config["architecture"]
    if name == "gated":
        gate = (x @ t["W_enc"] + t["b_gate"]) > 0
        codes = gate * np.maximum(x @ (t["W_enc"] * np.exp(t["r_mag"])) + t["b_mag"], 0)
    else:
        pre = x @ t["W_enc"] + t["b_enc"]
        codes = {
            "standard": lambda: np.maximum(pre, 0),
            "topk": lambda: topk_rows(pre, config["k"]),
            "jumprelu": lambda: np.maximum(pre, 0) * (pre > t["threshold"]),
        }[name]()
    pre, bound = encoder_pre_activations(sae, X)  # a code at its cut may fall either way
    undecided = undecided_codes(pre, bound + ATOL, **code_activation(sae))
    assert_codes_agree(sae.transform(X), codes, undecided, RTOL * np.abs(codes) + ATOL)
    sparsity = load_file(tmp_path / "s" / "sparsity.safetensors")["sparsity"]
    np.testing.assert_allclose(10.0**sparsity - 1e-10, sae.latent_frequency_, rtol=1e-4, atol=1e-9)
    # And back: the SAELens files load as the model they came from.
    back = io.load(tmp_path / "s")
    ours = sae.transform(X)
    assert_codes_agree(back.transform(X), ours, undecided, RTOL * np.abs(ours) + ATOL)


# --------------------------------------------------------------------- sparsify


def sparsify_folder(path, tensors, **fields):
    path.mkdir(parents=True)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
        path / "sae.safetensors",
    )
    config = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": F,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
        **fields,
    }
    (path / "cfg.json").write_text(json.dumps(config))
    return path


def test_sparsify_files_load_with_their_codes(tmp_path):
    W_enc, b_enc, W_dec, b_dec = f64(*weights(unit=True))
    folder = sparsify_folder(
        tmp_path / "layers.6",
        {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec},
    )
    sae = io.load(folder)
    assert (sae.architecture, sae.k, sae.metadata_["hook_name"]) == ("topk", K, "layers.6")
    t = [w.astype(np.float32).astype(np.float64) for w in (W_enc, b_enc, W_dec, b_dec)]
    X = inputs()
    # sparsify: topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias)), codes @ W_dec + b_dec.
    codes = topk_rows(np.maximum((X - t[3]) @ t[0] + t[1], 0), K)
    check_equivalent(sae, X, codes, t[2], t[3])
    assert ActivationExtractor.from_metadata(sae, model="m").get_params()["hook"] == "resid_post"


def test_sparsify_bfloat16_file_with_rows_normalised_before_rounding_loads(tmp_path):
    from safetensors.torch import save_file as save_torch

    rng = np.random.default_rng(3)
    d, f = 768, 64
    W_dec = rng.normal(size=(f, d))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    tensors = {
        "encoder.weight": torch.tensor(W_dec, dtype=torch.bfloat16),
        "encoder.bias": torch.zeros(f, dtype=torch.bfloat16),
        "W_dec": torch.tensor(W_dec, dtype=torch.bfloat16),  # norms 1 +- ~4e-4 after rounding
        "b_dec": torch.zeros(d, dtype=torch.bfloat16),
    }
    folder = tmp_path / "layers.2"
    folder.mkdir()
    save_torch(tensors, folder / "sae.safetensors")
    config = {"activation": "topk", "num_latents": f, "k": K, "d_in": d, "normalize_decoder": True}
    (folder / "cfg.json").write_text(json.dumps(config))
    sae = io.load(folder)
    t = {name: value.double().numpy() for name, value in tensors.items()}
    X = np.random.default_rng(4).normal(size=(200, d))
    codes = topk_rows(np.maximum(X @ t["encoder.weight"].T, 0), K)
    pre, bound = encoder_pre_activations(sae, X)  # a code at its cut may fall either way
    undecided = undecided_codes(pre, bound + 1e-4, **code_activation(sae))
    ours = sae.transform(X.astype(np.float32))
    assert_codes_agree(ours, codes, undecided, 1e-5 * np.abs(codes) + 1e-4)


def test_topk_with_one_shared_decoder_norm_loads_exactly(tmp_path):
    W_enc, b_enc, W_dec, b_dec = f64(*weights(unit=True))
    folder = saelens_folder(
        tmp_path / "s",
        "topk",
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec * 4, "b_dec": b_dec},
        k=K,
    )
    sae = io.load(folder)
    t = [w.astype(np.float32).astype(np.float64) for w in (W_enc, b_enc, W_dec * 4, b_dec)]
    X = inputs()
    codes = topk_rows((X - t[3]) @ t[0] + t[1], K)
    check_equivalent(sae, X, codes, t[2], t[3])


def test_sparsify_multi_hook_root_and_unsupported_files(tmp_path):
    W_enc, b_enc, W_dec, b_dec = weights(unit=True)
    tensors = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    sparsify_folder(tmp_path / "root" / "layers.3", tensors)
    with pytest.raises(FormatError, match=r"load one of \['layers.3'\]"):
        io.load(tmp_path / "root")
    folder = sparsify_folder(tmp_path / "skip", {**tensors, "W_skip": np.zeros((D, D))})
    with pytest.raises(FormatError, match="W_skip"):
        io.load(folder)
    folder = sparsify_folder(tmp_path / "tc", tensors, transcode=True)
    with pytest.raises(FormatError, match="transcoder"):
        io.load(folder)
    folder = sparsify_folder(tmp_path / "signed", tensors, signed=True)
    with pytest.raises(FormatError, match="signed=true"):
        io.load(folder)
    folder = sparsify_folder(tmp_path / "gm", tensors, activation="groupmax")
    with pytest.raises(FormatError, match="activation 'groupmax'"):
        io.load(folder)


# ---------------------------------------------------------- dictionary_learning


def dl_folder(path, dict_class, state, **trainer):
    path.mkdir()
    torch.save(
        {
            k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
            for k, v in state.items()
        },
        path / "ae.pt",
    )
    config = {
        "trainer": {
            "dict_class": dict_class,
            "activation_dim": D,
            "dict_size": F,
            "lm_name": "tiny",
            "layer": 2,
            "submodule_name": "resid_post_layer_2",
            **trainer,
        },
        "buffer": {"ctx_len": 64},
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def as32(*arrays):
    return [torch.tensor(np.asarray(a, np.float32)) for a in arrays]


@pytest.mark.parametrize(
    "dict_class",
    [
        "AutoEncoder",
        "JumpReluAutoEncoder",
        "AutoEncoderTopK",
        "BatchTopKSAE",
        "MatryoshkaBatchTopKSAE",
        "GatedAutoEncoder",
    ],
)
def test_dictionary_learning_files_load_with_their_codes(dict_class, tmp_path):
    topk = dict_class == "AutoEncoderTopK"
    W_enc, b_enc, W_dec, b_dec = as32(*weights(unit=topk))
    rng = np.random.default_rng(7)
    k = torch.tensor(K, dtype=torch.int)
    if dict_class == "AutoEncoder":
        state = {
            "bias": b_dec,
            "encoder.weight": W_enc.T.contiguous(),
            "encoder.bias": b_enc,
            "decoder.weight": W_dec.T.contiguous(),
        }
    elif dict_class == "JumpReluAutoEncoder":
        state = {
            "W_enc": W_enc,
            "b_enc": b_enc,
            "W_dec": W_dec,
            "b_dec": b_dec,
            "threshold": torch.tensor(rng.uniform(-0.05, 0.3, F), dtype=torch.float32),
        }
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        state = {
            "b_dec": b_dec,
            "k": k,
            "threshold": torch.tensor(0.2),
            "encoder.weight": W_enc.T.contiguous(),
            "encoder.bias": b_enc,
            "decoder.weight": W_dec.T.contiguous(),
        }
    elif dict_class == "MatryoshkaBatchTopKSAE":
        state = {
            "W_enc": W_enc,
            "b_enc": b_enc,
            "W_dec": W_dec,
            "b_dec": b_dec,
            "k": k,
            "threshold": torch.tensor(0.15),
            "group_sizes": torch.tensor([8, 12, 20]),
        }
    else:
        state = {
            "decoder_bias": b_dec,
            "r_mag": torch.tensor(rng.normal(size=F) * 0.3).float(),
            "gate_bias": b_enc,
            "mag_bias": torch.tensor(rng.normal(size=F) * 0.1).float(),
            "encoder.weight": W_enc.T.contiguous(),
            "decoder.weight": W_dec.T.contiguous(),
        }
    sae = io.load(dl_folder(tmp_path / "dl", dict_class, state, k=K))
    s = {name: value.double().numpy() for name, value in state.items()}
    X = inputs()
    # dictionary_learning's encode/decode (dictionary.py, trainers/*.py), in float64.
    if dict_class == "AutoEncoder":
        codes = np.maximum((X - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"], 0)
        W, b = s["decoder.weight"].T, s["bias"]
    elif dict_class == "JumpReluAutoEncoder":
        pre = X @ s["W_enc"] + s["b_enc"]
        codes = np.maximum(pre * (pre > s["threshold"]), 0)
        W, b = s["W_dec"], s["b_dec"]
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = np.maximum((X - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"], 0)
        codes = topk_rows(post, K) if topk else post * (post > s["threshold"])
        W, b = s["decoder.weight"].T, s["b_dec"]
    elif dict_class == "MatryoshkaBatchTopKSAE":
        post = np.maximum((X - s["b_dec"]) @ s["W_enc"] + s["b_enc"], 0)
        codes, W, b = post * (post > s["threshold"]), s["W_dec"], s["b_dec"]
    else:
        x_enc = (X - s["decoder_bias"]) @ s["encoder.weight"].T
        gate = (x_enc + s["gate_bias"]) > 0
        codes = gate * np.maximum(np.exp(s["r_mag"]) * x_enc + s["mag_bias"], 0)
        W, b = s["decoder.weight"].T, s["decoder_bias"]
    check_equivalent(sae, X, codes, W, b)
    expected = {
        "AutoEncoder": "relu",
        "JumpReluAutoEncoder": "jumprelu",
        "AutoEncoderTopK": "topk",
        "GatedAutoEncoder": "gated",
    }
    # A shared threshold times non-unit row norms is one threshold per latent: JumpReLU.
    assert sae.architecture == expected.get(dict_class, "jumprelu")
    assert sae.metadata_["model_name"] == "tiny" and sae.metadata_["context_size"] == 64
    extractor = ActivationExtractor.from_metadata(sae)
    assert (extractor.model, extractor.hook, extractor.layer) == ("tiny", "resid_post", 2)


def test_dictionary_learning_unit_norm_batchtopk_and_matryoshka_keep_their_architecture(tmp_path):
    W_enc, b_enc, W_dec, b_dec = as32(*weights(unit=True))
    k = torch.tensor(K, dtype=torch.int)
    state = {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "W_dec": W_dec,
        "b_dec": b_dec,
        "k": k,
        "threshold": torch.tensor(0.15),
        "group_sizes": torch.tensor([8, 12, 20]),
    }
    sae = io.load(dl_folder(tmp_path / "m", "MatryoshkaBatchTopKSAE", state))
    assert (sae.architecture, sae.k, list(sae.prefix_sizes)) == ("matryoshka", K, [8, 20, 40])
    assert sae.threshold_.shape == ()
    state = {
        "b_dec": b_dec,
        "k": k,
        "threshold": torch.tensor(-1.0),  # never calibrated
        "encoder.weight": W_enc.T.contiguous(),
        "encoder.bias": b_enc,
        "decoder.weight": W_dec.T.contiguous(),
    }
    sae = io.load(dl_folder(tmp_path / "b", "BatchTopKSAE", state))
    assert sae.architecture == "batchtopk" and float(sae.threshold_) == 0.0


def test_dictionary_learning_k_from_the_config_when_the_state_has_none(tmp_path):
    W_enc, b_enc, W_dec, b_dec = as32(*weights(unit=True))
    state = {
        "b_dec": b_dec,
        "encoder.weight": W_enc.T.contiguous(),
        "encoder.bias": b_enc,
        "decoder.weight": W_dec.T.contiguous(),
    }
    sae = io.load(dl_folder(tmp_path / "t", "AutoEncoderTopK", state, k=3))
    assert (sae.architecture, sae.k) == ("topk", 3)


def test_dictionary_learning_bad_files(tmp_path):
    folder = dl_folder(tmp_path / "x", "AutoEncoderNew", {"bias": np.zeros(D, np.float32)})
    with pytest.raises(FormatError, match="dict_class 'AutoEncoderNew' is not one skSAE reads"):
        io.load(folder)
    folder = tmp_path / "y"
    folder.mkdir()
    (folder / "ae.pt").write_bytes(b"not a torch file")
    (folder / "config.json").write_text(
        json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": D, "dict_size": F}})
    )
    with pytest.raises(FormatError, match="ae.pt is not a readable torch state dict"):
        io.load(folder)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("k", torch.tensor(2.9), "tensor 'k' is 2.9, expected a positive integer"),
        ("k", torch.tensor(0, dtype=torch.int), "tensor 'k' is 0, expected a positive integer"),
        (
            "group_sizes",
            torch.tensor([8.5, 11.5, 20.0]),
            r"tensor 'group_sizes' is \[8.5, 11.5, 20.0\], expected positive integer group",
        ),
    ],
)
def test_dictionary_learning_non_integers_are_refused(name, value, message, tmp_path):
    W_enc, b_enc, W_dec, b_dec = as32(*weights(unit=True))
    state = {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "W_dec": W_dec,
        "b_dec": b_dec,
        "k": torch.tensor(K, dtype=torch.int),
        "threshold": torch.tensor(0.15),
        "group_sizes": torch.tensor([8, 12, 20]),
        name: value,
    }
    with pytest.raises(FormatError, match=f"ae.pt: {message}"):
        io.load(dl_folder(tmp_path / "m", "MatryoshkaBatchTopKSAE", state))


# --------------------------------------------------------- fine-tune and hooks


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_imported_model_fine_tunes_in_its_own_units(architecture, tmp_path):
    _, b_enc, W_dec, b_dec = weights(unit=True)
    # A tied SAE for activations 50 times larger than unit scale.
    tensors = {"W_enc": W_dec.T, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec * 50}
    fields = {"k": K} if architecture == "topk" else {}
    if architecture == "jumprelu":
        tensors["threshold"] = np.full(F, 5.0)
    sae = io.load(saelens_folder(tmp_path / "s", architecture, tensors, False, **fields))
    X = (inputs(n=2000) * 50).astype(np.float32)  # activations far from unit scale
    before = sae.score(X)
    sae.set_params(target_l0=K if architecture == "jumprelu" else None)
    sae.partial_fit(X)
    assert sae.input_scale_ == pytest.approx(1 / 50, rel=0.1)  # measured on X
    assert sae.n_steps_ > 0 and np.isfinite(sae.components_).all()
    assert sae.score(X) > before
    assert sae.metadata_["hook_name"] == "blocks.2.hook_resid_post"  # kept by the fine-tune
    refit = clone(sae).fit(X)  # same hyperparameters, a fresh model
    assert refit.components_.shape == sae.components_.shape
    # A plain fit of the loaded estimator trains a new model too, with its parameters.
    imported = io.load(tmp_path / "s").set_params(n_components=24)
    imported.fit(X)
    assert imported.components_.shape == (24, D)
    assert imported.input_scale_ == pytest.approx(1 / 50, rel=0.1)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("blocks.6.hook_resid_post", ("resid_post", 6)),
        ("blocks.6.hook_mlp_out", ("mlp_out", 6)),
        ("blocks.6.hook_attn_out", ("attn_out", 6)),
        ("blocks.6.hook_resid_pre", ("resid_post", 5)),
        ("layers.6", ("resid_post", 6)),
        ("model.layers.6.mlp", ("mlp_out", 6)),
        ("transformer.h.2.attn", ("attn_out", 2)),
        ("mlp_out_layer_3", ("mlp_out", 3)),
        ("model.layers.3.mlp.down_proj", ("model.layers.3.mlp.down_proj", 0)),
    ],
)
def test_hook_names_map_to_extractor_hooks(name, expected):
    assert extractor_hook(name) == expected


def test_hook_names_without_a_module_are_refused():
    for name in ("blocks.0.hook_resid_pre", "blocks.3.hook_resid_mid", "blocks.3.hook_z"):
        with pytest.raises(ValueError, match="not the output of a module"):
            extractor_hook(name)
    assert transformer_lens_name("mlp_out", 2) == "blocks.2.hook_mlp_out"
    assert transformer_lens_name("model.layers.2", 0) is None


def test_hook_metadata_round_trips_through_a_saved_model(tiny_model_dir, tmp_path):
    extractor = ActivationExtractor(
        tiny_model_dir, layer=1, hook="mlp_out", context_size=16, device="cpu"
    )
    X = extractor.transform(TEXTS)
    sae = SparseAutoencoder(n_components=32, k=4, max_iter=1, random_state=0).fit(X)
    metadata = extractor.hook_metadata()
    assert metadata["hook_name"] == "blocks.1.hook_mlp_out"
    assert metadata["hf_hook_name"] in ("transformer.h.1.mlp", "model.layers.1.mlp")
    expected = loss_recovered(sae, extractor, TEXTS)
    for format in ("skSAE", "saelens"):
        io.save(sae, tmp_path / format, format=format, **metadata)
        loaded = io.load(tmp_path / format)
        rebuilt = ActivationExtractor.from_metadata(loaded, device="cpu")
        assert (rebuilt.hook, rebuilt.layer, rebuilt.context_size) == ("mlp_out", 1, 16)
        np.testing.assert_array_equal(rebuilt.transform(TEXTS), X)
        # An ordinary fitted estimator for the package's tools.
        assert loss_recovered(loaded, rebuilt, TEXTS) == pytest.approx(expected, rel=1e-4)
        page = write_dashboard(loaded, rebuilt, TEXTS, tmp_path / f"{format}.html", n_latents=2)
        assert page.stat().st_size > 1000
        steered = generate_with_steering(
            loaded, rebuilt, "the", latent=0, scale=5.0, max_new_tokens=3
        )
        assert isinstance(steered, str)
        sparse = loaded.set_params(sparse_output=True).transform(X)
        np.testing.assert_allclose(sparse.toarray(), sae.transform(X), rtol=1e-6, atol=1e-9)


def test_from_metadata_needs_a_hook():
    with pytest.raises(ValueError, match="without metadata_"):
        ActivationExtractor.from_metadata(SparseAutoencoder())
    with pytest.raises(ValueError, match="names no hook"):
        ActivationExtractor.from_metadata({"model_name": "m"})
