"""Training metrics to a logger at the progress checks (skSAE.logging)."""

import pickle

import numpy as np
import pytest
from sklearn.base import clone

from skSAE import SparseAutoencoder
from skSAE.logging import TensorBoardLogger


class Recorder:
    def __init__(self):
        self.calls = []
        self.closed = 0

    def log(self, metrics, step):
        self.calls.append((step, dict(metrics)))

    def close(self):
        self.closed += 1


def test_logger_gets_the_metrics_at_every_check(small_X):
    recorder = Recorder()
    sae = SparseAutoencoder(
        n_components=32,
        architecture="relu",
        target_l0=3,
        max_iter=2,
        batch_size=4,
        random_state=0,
        logger=recorder,
    ).fit(small_X)  # 50 steps a pass: checks at 32, 50, 64, 96, 100
    assert [step for step, _ in recorder.calls] == [32, 50, 64, 96, 100]
    assert recorder.closed == 1
    metrics = recorder.calls[-1][1]
    assert set(metrics) == {
        "loss",
        "l0",
        "explained_variance",
        "dead_fraction",
        "learning_rate",
        "sparsity_coefficient",
    }
    assert all(isinstance(value, float) for value in metrics.values())
    assert metrics["sparsity_coefficient"] == pytest.approx(sae.sparsity_coefficient_)
    assert 0 <= metrics["dead_fraction"] <= 1 and metrics["learning_rate"] >= 0
    assert recorder.calls[0][1]["learning_rate"] > metrics["learning_rate"]  # the decay


def test_a_logger_changes_nothing_in_the_model(small_X):
    params = dict(n_components=32, k=3, max_iter=2, batch_size=16, random_state=0)
    plain = SparseAutoencoder(**params).fit(small_X)
    logged = SparseAutoencoder(**params, logger=Recorder()).fit(small_X)
    np.testing.assert_array_equal(plain.components_, logged.components_)


def test_tensorboard_logger_clones_pickles_and_writes_scalars(small_X, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "runs")
    sae = SparseAutoencoder(
        n_components=32, k=3, max_iter=1, batch_size=8, random_state=0, logger=logger
    )
    assert isinstance(clone(sae).logger, TensorBoardLogger)
    sae.fit(small_X)
    restored = pickle.loads(pickle.dumps(sae))  # the live writer is not pickled
    assert restored.logger.log_dir == tmp_path / "runs"
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    assert {"sae/loss", "sae/l0", "sae/explained_variance"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("sae/l0")] == [25]
