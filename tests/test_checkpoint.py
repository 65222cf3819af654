"""Resumable training: `fit` with ``checkpoint_path`` survives a SIGKILL, bit for bit."""

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from skSAE import SparseAutoencoder
from skSAE._checkpoint import CheckpointMismatchError

CONFIGS = {
    "topk": {"architecture": "topk", "k": 4},
    "relu-target": {"architecture": "relu", "target_l0": 4},
    "batchtopk": {"architecture": "batchtopk", "k": 4},
    "jumprelu-target": {"architecture": "jumprelu", "target_l0": 4},
    "relu-resample": {"architecture": "relu", "target_l0": 4, "resample_dead": True},
    "matryoshka": {"architecture": "matryoshka", "k": 4},
    "gated-target": {"architecture": "gated", "target_l0": 4},
}
COMMON = dict(n_components=64, max_iter=3, batch_size=32, random_state=0)
FITTED = ("W_enc_", "b_enc_", "components_", "b_dec_", "latent_frequency_")


def data(n=1500, d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def assert_same_model(a, b):
    for name in FITTED + (("threshold_",) if hasattr(a, "threshold_") else ()):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.loss_curve_ == b.loss_curve_
    assert (a.n_steps_, a.n_iter_) == (b.n_steps_, b.n_iter_)
    assert a.dead_fraction_ == b.dead_fraction_


class SimulatedCrashError(Exception):
    pass


def crash_at(monkeypatch, step):
    """Make training raise before the given step, as a crash would stop it."""
    original = SparseAutoencoder._minibatch_step

    def step_or_crash(self, run, stats, x_BD):
        if self.n_steps_ == step:
            raise SimulatedCrashError
        return original(self, run, stats, x_BD)

    monkeypatch.setattr(SparseAutoencoder, "_minibatch_step", step_or_crash)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resumed_fit_equals_an_uninterrupted_one(name, tmp_path, monkeypatch):
    X = data()
    params = {**COMMON, **CONFIGS[name]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = SparseAutoencoder(**params).fit(X)
        path = tmp_path / "run.ckpt"
        crash_at(monkeypatch, 97)  # mid-pass (47 steps a pass), after the checkpoint at 64
        with pytest.raises(SimulatedCrashError):
            SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=50).fit(X)
        assert path.exists()
        monkeypatch.undo()
        resumed = SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=50).fit(X)
    assert_same_model(resumed, reference)
    assert not path.exists()  # a completed fit removes its checkpoint


def test_checkpoint_of_other_data_or_parameters_is_refused(tmp_path, monkeypatch):
    X = data()
    path = tmp_path / "run.ckpt"
    crash_at(monkeypatch, 80)
    with pytest.raises(SimulatedCrashError):
        SparseAutoencoder(**COMMON, k=4, checkpoint_path=path, checkpoint_every=32).fit(X)
    monkeypatch.undo()
    with pytest.raises(CheckpointMismatchError, match="rows_sha256 differ"):
        SparseAutoencoder(**COMMON, k=4, checkpoint_path=path).fit(data(seed=1))
    with pytest.raises(CheckpointMismatchError, match="params_sha256 differ"):
        SparseAutoencoder(**COMMON, k=5, checkpoint_path=path).fit(X)
    assert path.exists()  # refused, never overwritten or deleted
    # Only a setting that does not change the model may differ.
    SparseAutoencoder(**COMMON, k=4, checkpoint_path=path, verbose=0, checkpoint_every=7).fit(X)


def test_unreadable_checkpoint_gets_a_clear_error(tmp_path):
    path = tmp_path / "run.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable skSAE checkpoint.*delete it"):
        SparseAutoencoder(**COMMON, k=4, checkpoint_path=path).fit(data())


CHILD = textwrap.dedent(
    """
    import os, signal, sys, warnings
    import numpy as np
    from skSAE import SparseAutoencoder
    import skSAE._checkpoint as checkpoint

    X = np.random.default_rng(0).normal(size=(1500, 16)).astype(np.float32)
    kill_at, mode, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    original_step = SparseAutoencoder._minibatch_step
    original_replace = os.replace

    def step(self, run, stats, x_BD):
        if mode == "step" and self.n_steps_ == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_step(self, run, stats, x_BD)

    def replace(source, target):
        # Killed during the write of the checkpoint after step kill_at: the new file is
        # written (maybe in part) but never renamed over the previous one.
        if mode == "write" and SAE.n_steps_ >= kill_at:
            with open(source, "r+b") as file:
                file.truncate(os.path.getsize(source) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return original_replace(source, target)

    SparseAutoencoder._minibatch_step = step
    checkpoint.os.replace = replace
    warnings.simplefilter("ignore")
    SAE = SparseAutoencoder(n_components=64, k=4, max_iter=3, batch_size=32, random_state=0,
                            target_l0=4, architecture=sys.argv[4], checkpoint_path=path,
                            checkpoint_every=40)
    SAE.fit(X)
    np.savez(path + ".result.npz", W_enc=SAE.W_enc_, components=SAE.components_,
             b_enc=SAE.b_enc_, b_dec=SAE.b_dec_, steps=SAE.n_steps_)
    """
)


def run_child(tmp_path, kill_at, mode, architecture):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.run(
        [sys.executable, str(script), str(kill_at), mode, str(tmp_path / "run.ckpt"), architecture],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_sigkill_at_a_random_step_then_rerun_equals_an_uninterrupted_fit(architecture, tmp_path):
    kill_at = int(np.random.default_rng().integers(45, 140))  # 47 steps a pass, 141 in all
    killed = run_child(tmp_path, kill_at, "step", architecture)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "run.ckpt").exists()
    rerun = run_child(tmp_path, -1, "none", architecture)
    assert rerun.returncode == 0, rerun.stderr
    params = {**COMMON, "k": 4, "target_l0": 4, "architecture": architecture}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = SparseAutoencoder(**params).fit(data())
    result = np.load(tmp_path / "run.ckpt.result.npz")
    for name, attribute in (
        ("W_enc", "W_enc_"),
        ("components", "components_"),
        ("b_enc", "b_enc_"),
        ("b_dec", "b_dec_"),
    ):
        np.testing.assert_array_equal(
            result[name], getattr(reference, attribute), err_msg=f"killed at step {kill_at}: {name}"
        )
    assert int(result["steps"]) == reference.n_steps_


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    killed = run_child(tmp_path, 100, "write", "topk")  # dies writing the checkpoint at 120
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.ckpt.partial")]
    assert leftovers  # the half-written file never replaced the checkpoint of step 96
    rerun = run_child(tmp_path, -1, "none", "topk")
    assert rerun.returncode == 0, rerun.stderr
    assert not any(p.name.startswith(".run.ckpt.partial") for p in tmp_path.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = SparseAutoencoder(**COMMON, k=4, target_l0=4).fit(data())
    result = np.load(tmp_path / "run.ckpt.result.npz")
    np.testing.assert_array_equal(result["components"], reference.components_)


@pytest.mark.parametrize("crash_step", [40, 47, 50])  # inside, at the end of, after a pass
def test_resumed_fit_on_a_memmap_equals_an_uninterrupted_one(crash_step, tmp_path, monkeypatch):
    import skSAE._data

    monkeypatch.setattr(skSAE._data, "CHUNK_BYTES", 4 * 16 * 100)  # 100-row chunks
    X = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float32, shape=(1500, 16))
    X[:] = data()
    X.flush()
    params = {**COMMON, "k": 4}
    reference = SparseAutoencoder(**params).fit(X)
    path = tmp_path / "run.ckpt"
    original = SparseAutoencoder._minibatch_step

    def step_or_crash(self, run, stats, x_BD):
        if self.n_steps_ == crash_step + 32:
            raise SimulatedCrashError
        return original(self, run, stats, x_BD)

    monkeypatch.setattr(SparseAutoencoder, "_minibatch_step", step_or_crash)
    with pytest.raises(SimulatedCrashError):
        SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=crash_step).fit(X)
    monkeypatch.setattr(SparseAutoencoder, "_minibatch_step", original)
    resumed = SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=crash_step).fit(X)
    assert_same_model(resumed, reference)
