"""Resumable training: `fit` with ``checkpoint_path`` survives a SIGKILL, bit for bit."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from conftest import mount_tmpfs

import skSAE._checkpoint
from skSAE import SparseAutoencoder
from skSAE._checkpoint import (
    CheckpointCorruptError,
    CheckpointInUseError,
    CheckpointMismatchError,
    CheckpointWriteError,
)

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


def count_steps(monkeypatch):
    """A list that grows by one at each training step from now on."""
    steps = []
    original = SparseAutoencoder._minibatch_step

    def counted(self, run, stats, x_BD):
        steps.append(self.n_steps_)
        return original(self, run, stats, x_BD)

    monkeypatch.setattr(SparseAutoencoder, "_minibatch_step", counted)
    return steps


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
        steps = count_steps(monkeypatch)
        resumed = SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=50).fit(X)
    assert steps[0] == 64 and len(steps) == 141 - 64  # from the checkpoint at step 64
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
    import os, signal, sys, time, warnings
    import numpy as np
    from skSAE import SparseAutoencoder
    import skSAE._checkpoint as checkpoint

    X = np.random.default_rng(0).normal(size=(1500, 16)).astype(np.float32)
    kill_at, mode, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    original_step = SparseAutoencoder._minibatch_step
    original_replace = os.replace

    trained = []

    def step(self, run, stats, x_BD):
        trained.append(self.n_steps_)
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
        # Paused in the middle of its first write, until the test says go.
        if mode == "pause" and not os.path.exists(path + ".ready"):
            open(path + ".ready", "w").close()
            for _ in range(1200):
                if os.path.exists(path + ".go"):
                    break
                time.sleep(0.05)
        return original_replace(source, target)

    SparseAutoencoder._minibatch_step = step
    checkpoint.os.replace = replace
    warnings.simplefilter("ignore")
    SAE = SparseAutoencoder(n_components=64, k=4, max_iter=3, batch_size=32, random_state=0,
                            target_l0=4, architecture=sys.argv[4], checkpoint_path=path,
                            checkpoint_every=40 if sys.argv[5] == "fit" else 10)
    if sys.argv[5] == "fit":
        SAE.fit(X)
    else:  # a loop of partial_fit calls over three blocks of X
        for block in np.array_split(X, 3):
            SAE.partial_fit(block)
    np.savez(path + ".result.npz", W_enc=SAE.W_enc_, components=SAE.components_,
             b_enc=SAE.b_enc_, b_dec=SAE.b_dec_, steps=SAE.n_steps_, first_step=trained[0])
    """
)


def child_command(tmp_path, kill_at, mode, architecture, call="fit"):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = str(tmp_path / "run.ckpt")
    return [sys.executable, str(script), str(kill_at), mode, path, architecture, call]


def run_child(tmp_path, kill_at, mode, architecture, call="fit"):
    return subprocess.run(
        child_command(tmp_path, kill_at, mode, architecture, call),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_sigkill_at_a_random_step_then_rerun_equals_an_uninterrupted_fit(architecture, tmp_path):
    # 47 steps a pass, 141 in all; the first checkpoint is written at the check that ends
    # pass 1 (step 47, the first check at or past checkpoint_every=40): kill after it.
    kill_at = int(np.random.default_rng().integers(48, 140))
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


# ---------------------------------------------------------------- partial_fit

BLOCKS = [data(n=600, seed=seed) for seed in range(3)]  # 19 steps of 32 rows each
PARTIAL = dict(n_components=64, batch_size=32, random_state=0)


def partial_fits(params, blocks, **checkpointing):
    sae = SparseAutoencoder(**params, **checkpointing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks:
            sae.partial_fit(block)
    return sae


# With checkpoint_every=10, checkpoints are written at step 19 (the end of the first
# call), 32 (inside the second) and 38 (its end); none inside the third (steps 39-57).
@pytest.mark.parametrize(
    "name, crash_step",
    [
        ("topk", 10),  # inside the first call, before any checkpoint
        ("topk", 35),  # inside the second call, after a checkpoint inside it
        ("topk", 47),  # inside the third call, after the second call's end
        ("relu-target", 35),
        ("batchtopk", 47),
        ("jumprelu-target", 35),
        ("matryoshka", 35),
        ("gated-target", 47),
    ],
)
def test_resumed_partial_fits_equal_an_uninterrupted_run(name, crash_step, tmp_path, monkeypatch):
    params = {**PARTIAL, **CONFIGS[name]}
    reference = partial_fits(params, BLOCKS)
    path = tmp_path / "run.ckpt"
    crash_at(monkeypatch, crash_step)
    with pytest.raises(SimulatedCrashError):
        partial_fits(params, BLOCKS, checkpoint_path=path, checkpoint_every=10)
    monkeypatch.undo()
    steps = count_steps(monkeypatch)
    resumed = partial_fits(params, BLOCKS, checkpoint_path=path, checkpoint_every=10)
    checkpointed = {10: 0, 35: 32, 47: 38}[crash_step]
    assert steps[0] == checkpointed and len(steps) == 57 - checkpointed
    assert_same_model(resumed, reference)
    assert path.exists()  # the file of a partial_fit run stays: a rerun replays it


def test_a_rerun_of_a_finished_partial_fit_loop_replays_it_without_training(tmp_path):
    path = tmp_path / "run.ckpt"
    params = {**PARTIAL, "k": 4}
    finished = partial_fits(params, BLOCKS, checkpoint_path=path, checkpoint_every=1)
    replayed = SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=1)
    steps = []
    for block in BLOCKS:
        replayed.partial_fit(block)
        steps.append(replayed.n_steps_)
    assert steps == [57, 57, 57]  # the state after the last call, from the first call on
    assert_same_model(replayed, finished)
    more = data(n=320, seed=9)
    assert replayed.partial_fit(more).n_steps_ == 67  # past the file's calls it trains
    finished.partial_fit(more)
    np.testing.assert_array_equal(replayed.components_, finished.components_)


def crashed_partial_fits(params, path, monkeypatch, crash_step):
    crash_at(monkeypatch, crash_step)
    with pytest.raises(SimulatedCrashError):
        partial_fits(params, BLOCKS, checkpoint_path=path, checkpoint_every=10)
    monkeypatch.undo()


def test_partial_fit_checkpoint_refuses_other_blocks_and_other_calls(tmp_path, monkeypatch):
    params = {**PARTIAL, "k": 4}
    path = tmp_path / "two-calls.ckpt"
    crashed_partial_fits(params, path, monkeypatch, 47)  # holds calls 1 and 2
    sae = SparseAutoencoder(**params, checkpoint_path=path)
    sae.partial_fit(BLOCKS[0])
    with pytest.raises(CheckpointMismatchError, match="partial_fit call 2 had other data"):
        sae.partial_fit(BLOCKS[2])
    with pytest.raises(CheckpointMismatchError, match="params_sha256"):
        SparseAutoencoder(**{**params, "k": 8}, checkpoint_path=path).partial_fit(BLOCKS[0])
    with pytest.raises(CheckpointMismatchError, match="of a partial_fit run, not of a fit"):
        SparseAutoencoder(**params, checkpoint_path=path).fit(BLOCKS[0])
    # The call in progress is checked too.
    path = tmp_path / "in-progress.ckpt"
    crashed_partial_fits(params, path, monkeypatch, 35)  # holds call 1, call 2 midway
    written = path.read_bytes()
    sae = SparseAutoencoder(**params, checkpoint_path=path)
    sae.partial_fit(BLOCKS[0])
    with pytest.raises(CheckpointMismatchError, match="rows_sha256"):
        sae.partial_fit(BLOCKS[2])
    assert path.read_bytes() == written  # refused, never overwritten


def test_a_refused_block_leaves_the_replay_where_it_was(tmp_path, monkeypatch):
    params = {**PARTIAL, "k": 4}
    reference = partial_fits(params, BLOCKS)
    path = tmp_path / "run.ckpt"
    crashed_partial_fits(params, path, monkeypatch, 47)  # holds calls 1 and 2
    sae = SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=10)
    sae.partial_fit(BLOCKS[0])
    with pytest.raises(CheckpointMismatchError):
        sae.partial_fit(BLOCKS[2])  # the wrong block for call 2
    for block in BLOCKS[1:]:  # then the right ones
        sae.partial_fit(block)
    assert_same_model(sae, reference)


def test_checkpointing_a_model_trained_without_it_is_refused(tmp_path):
    params = {**PARTIAL, "k": 4}
    fitted = SparseAutoencoder(**params, max_iter=1).fit(BLOCKS[0])
    fitted.set_params(checkpoint_path=tmp_path / "run.ckpt")
    with pytest.raises(ValueError, match="trained without it"):
        fitted.partial_fit(BLOCKS[1])
    assert not (tmp_path / "run.ckpt").exists()


def test_ctrl_c_in_a_checkpointed_loop_stops_it_and_a_rerun_continues(tmp_path, monkeypatch):
    params = {**PARTIAL, "k": 4}
    reference = partial_fits(params, BLOCKS)
    path = tmp_path / "run.ckpt"
    original = SparseAutoencoder._minibatch_step

    def step_or_interrupt(self, run, stats, x_BD):
        if self.n_steps_ == 35:
            raise KeyboardInterrupt
        return original(self, run, stats, x_BD)

    monkeypatch.setattr(SparseAutoencoder, "_minibatch_step", step_or_interrupt)
    sae = SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=10)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="interrupted"):
        for block in BLOCKS:
            sae.partial_fit(block)
    assert sae.n_steps_ == 35  # the weights trained so far are kept
    monkeypatch.undo()
    resumed = partial_fits(params, BLOCKS, checkpoint_path=path, checkpoint_every=10)
    assert_same_model(resumed, reference)


def test_interrupted_fit_keeps_its_checkpoint_and_a_rerun_continues(tmp_path, monkeypatch):
    X = data()
    params = {**COMMON, "k": 4}
    reference = SparseAutoencoder(**params).fit(X)
    path = tmp_path / "run.ckpt"
    original = SparseAutoencoder._minibatch_step

    def step_or_interrupt(self, run, stats, x_BD):
        if self.n_steps_ == 70:
            raise KeyboardInterrupt
        return original(self, run, stats, x_BD)

    monkeypatch.setattr(SparseAutoencoder, "_minibatch_step", step_or_interrupt)
    with pytest.warns(UserWarning, match="interrupted after 70 steps"):
        interrupted = SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=32)
        interrupted.fit(X)
    assert interrupted.n_steps_ == 70 and path.exists()
    monkeypatch.undo()
    steps = count_steps(monkeypatch)
    resumed = SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=32).fit(X)
    assert steps[0] == 64  # the last checkpoint before the interrupt
    assert_same_model(resumed, reference)
    assert not path.exists()


def test_sigkill_inside_a_partial_fit_loop_then_rerun_equals_an_uninterrupted_loop(tmp_path):
    kill_at = int(np.random.default_rng().integers(20, 48))  # 16 steps a call, 48 in all
    killed = run_child(tmp_path, kill_at, "step", "topk", call="partial_fit")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    rerun = run_child(tmp_path, -1, "none", "topk", call="partial_fit")
    assert rerun.returncode == 0, rerun.stderr
    params = {**COMMON, "k": 4, "target_l0": 4}
    del params["max_iter"]
    reference = partial_fits(params, np.array_split(data(), 3))
    result = np.load(tmp_path / "run.ckpt.result.npz")
    for name, attribute in (("W_enc", "W_enc_"), ("components", "components_")):
        np.testing.assert_array_equal(
            result[name], getattr(reference, attribute), err_msg=f"killed at step {kill_at}: {name}"
        )
    assert int(result["steps"]) == reference.n_steps_ == 48
    # Checkpoints at the ends of the calls (steps 16 and 32): the rerun starts there.
    assert int(result["first_step"]) == (16 if kill_at < 32 else 32)


# ------------------------------------------------------------- faults and races


@pytest.fixture
def small_disk(tmp_path):
    """``mount(kib)``: a folder on a tmpfs of that size (root only), unmounted at the end."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = []

    def mount(kib, remount=False):
        options = f"remount,size={kib}k" if remount else f"size={kib}k"
        mount_tmpfs(folder, options)
        mounted.append(folder)
        return folder

    yield mount
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_stops_with_a_clear_error_keeping_the_model_and_the_checkpoint(
    tmp_path, small_disk, monkeypatch
):
    X = data()
    params = {**COMMON, "k": 4}
    reference = SparseAutoencoder(**params).fit(X)
    # The size of one checkpoint, written at step 32 on an ordinary disk.
    sized = tmp_path / "sized.ckpt"
    crash_at(monkeypatch, 33)
    with pytest.raises(SimulatedCrashError):
        SparseAutoencoder(**params, checkpoint_path=sized, checkpoint_every=32).fit(X)
    monkeypatch.undo()
    size = sized.stat().st_size
    # Room for one checkpoint, not for the next one beside it (written at step 64).
    disk = small_disk(size * 3 // 2 // 1024)
    path = disk / "run.ckpt"
    sae = SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=32)
    with pytest.raises(CheckpointWriteError) as raised:
        sae.fit(X)
    error = raised.value
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    message = str(error)
    assert f"could not write the checkpoint to checkpoint_path={str(path)!r}" in message
    assert "the disk is full" in message and "previous checkpoint there is whole" in message
    assert "keeps the model trained so far (64 steps)" in message
    assert sorted(os.listdir(disk)) == ["run.ckpt"]  # no partial file, no lock left
    # The model of step 64 is kept, usable, and can be saved elsewhere.
    assert sae.n_steps_ == 64 and np.isfinite(sae.components_).all()
    assert sae.transform(X[:5]).shape == (5, 64)
    # Free space and run again: it continues from the checkpoint of step 32.
    small_disk(size * 4 // 1024, remount=True)
    steps = count_steps(monkeypatch)
    resumed = SparseAutoencoder(**params, checkpoint_path=path, checkpoint_every=32).fit(X)
    assert steps[0] == 32
    assert_same_model(resumed, reference)


def test_a_second_fit_on_a_checkpoint_path_in_use_is_refused_and_the_first_goes_on(tmp_path):
    path = tmp_path / "run.ckpt"
    # A fit in another process, paused inside its first checkpoint write.
    child = subprocess.Popen(
        child_command(tmp_path, -1, "pause", "topk"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run.ckpt.ready").exists():
            assert child.poll() is None, child.communicate()[1]
            assert time.monotonic() < deadline, "the child never reached its first checkpoint"
            time.sleep(0.05)
        in_flight = [p for p in tmp_path.iterdir() if p.name.startswith(".run.ckpt.partial-")]
        assert len(in_flight) == 1
        second = SparseAutoencoder(**COMMON, k=4, target_l0=4, checkpoint_path=path)
        with pytest.raises(
            CheckpointInUseError,
            match=rf"checkpoint_path={str(path)!r} is in use: process {child.pid} trains",
        ):
            second.fit(data())
        assert not hasattr(second, "components_")  # refused before any step
        assert in_flight[0].exists()  # the first run's write is untouched
    finally:
        (tmp_path / "run.ckpt.go").touch()
        _, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = SparseAutoencoder(**COMMON, k=4, target_l0=4).fit(data())
    result = np.load(tmp_path / "run.ckpt.result.npz")
    np.testing.assert_array_equal(result["components"], reference.components_)
    assert not any(p.name.startswith(".run.ckpt") for p in tmp_path.iterdir())  # nor a lock


def test_a_file_system_without_locks_trains_with_a_warning(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(skSAE._checkpoint.fcntl, "flock", no_locks)
    path = tmp_path / "run.ckpt"
    with pytest.warns(RuntimeWarning, match="does not support locks"):
        SparseAutoencoder(**PARTIAL, k=4, max_iter=1, checkpoint_path=path).fit(BLOCKS[0])


def crashed_fit_checkpoint(path, X, monkeypatch):
    """The bytes of the checkpoint (of step 32) a fit on ``X`` left when it crashed."""
    crash_at(monkeypatch, 40)
    with pytest.raises(SimulatedCrashError):
        SparseAutoencoder(**COMMON, k=4, checkpoint_path=path, checkpoint_every=32).fit(X)
    monkeypatch.undo()
    return path.read_bytes()


def test_a_damaged_checkpoint_is_refused_as_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    written = crashed_fit_checkpoint(path, data(), monkeypatch)
    rng = np.random.default_rng(0)
    damaged = bytearray(written)
    # 64 low bits flipped in the middle half, where the tensors' bytes lie: without a
    # checksum, such a file resumed silently into other weights.
    middle = np.arange(len(written) // 4, len(written) * 3 // 4, 4)
    for position in rng.choice(middle, 64, replace=False):
        damaged[position] ^= 0x01
    for content in (bytes(damaged), written[: len(written) - 100]):  # damaged, cut short
        path.write_bytes(content)
        with pytest.raises(CheckpointCorruptError, match=rf"{str(path)!r} is corrupt"):
            SparseAutoencoder(**COMMON, k=4, checkpoint_path=path).fit(data())
        assert path.read_bytes() == content  # refused, never overwritten or deleted


# None of these rows is among 256 evenly spaced ones (the sample hashed before).
@pytest.mark.parametrize("container, row", [("array", 1), ("array", 700), ("memmap", 1497)])
def test_a_checkpoint_of_data_with_one_other_row_is_refused(container, row, tmp_path, monkeypatch):
    X = data()
    if container == "memmap":
        memmap = np.lib.format.open_memmap(
            tmp_path / "X.npy", mode="w+", dtype=np.float32, shape=X.shape
        )
        memmap[:] = X
        X = memmap
    path = tmp_path / "run.ckpt"
    crashed_fit_checkpoint(path, X, monkeypatch)
    X[row, 3] = np.nextafter(X[row, 3], np.float32(np.inf))  # one value, one ulp
    with pytest.raises(CheckpointMismatchError, match="rows_sha256 differ"):
        SparseAutoencoder(**COMMON, k=4, checkpoint_path=path).fit(X)


def test_a_partial_fit_block_with_one_other_row_is_refused(tmp_path, monkeypatch):
    params = {**PARTIAL, "k": 4}
    path = tmp_path / "run.ckpt"
    crashed_partial_fits(params, path, monkeypatch, 47)  # holds calls 1 and 2
    sae = SparseAutoencoder(**params, checkpoint_path=path)
    sae.partial_fit(BLOCKS[0])
    block = BLOCKS[1].copy()
    block[5, 0] = np.nextafter(block[5, 0], np.float32(np.inf))
    with pytest.raises(CheckpointMismatchError, match="partial_fit call 2 had other data"):
        sae.partial_fit(block)
