"""Training-recipe pieces on their own, each against a plain reference."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from skSAE._architectures import ReLUModule
from skSAE._recipe import (
    DeadLatentTracker,
    SparsityCalibrator,
    decay_factor,
    default_learning_rate,
    geometric_median,
    resample_dead_latents,
    warmup_factor,
)


def test_default_learning_rate_follows_the_width_scaling():
    assert default_learning_rate(2**14) == pytest.approx(2e-4)
    assert default_learning_rate(2**12) == pytest.approx(4e-4)
    assert default_learning_rate(64) == pytest.approx(3.2e-3)


def test_warmup_factor_is_linear_then_one():
    assert [warmup_factor(step, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_decay_factor_falls_linearly_over_the_last_fraction():
    factors = [decay_factor(step, 10, 0.3) for step in range(10)]
    np.testing.assert_allclose(factors, [1] * 7 + [1.0, 2 / 3, 1 / 3])
    assert all(decay_factor(step, 10, 0.0) == 1.0 for step in range(10))


def test_geometric_median_minimises_the_summed_distance():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(60, 3)), rng.normal(size=(15, 3)) * 20 + 40])
    median = geometric_median(torch.from_numpy(x)).double().numpy()

    def total_distance(point):
        return np.linalg.norm(x - point, axis=1).sum()

    reference = minimize(
        total_distance,
        x.mean(axis=0),
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20_000},
    ).x
    assert total_distance(median) <= total_distance(reference) + 1e-4
    np.testing.assert_allclose(median, reference, atol=1e-3)
    # Robust to the outlying cluster, unlike the mean.
    assert np.linalg.norm(median) < 2 < np.linalg.norm(x.mean(axis=0))


def test_dead_latent_tracker_counts_rows_since_last_fire():
    rng = np.random.default_rng(0)
    tracker = DeadLatentTracker(5, window=25, device=torch.device("cpu"))
    assert not tracker.dead_F().any()  # nothing seen, nothing known to be dead
    since = np.zeros(5)
    seen = 0
    for n_rows in (10, 7, 12, 3, 9, 11):
        fires = rng.integers(0, 3, size=5) * (rng.random(5) < 0.3)
        tracker.update(torch.from_numpy(fires.astype(np.float32)), n_rows)
        since = np.where(fires > 0, 0, since + n_rows)
        seen += n_rows
        np.testing.assert_array_equal(tracker.rows_since_fired_F.numpy(), since)
        np.testing.assert_array_equal(tracker.dead_F().numpy(), since >= min(25, seen))


def test_dead_latent_tracker_counts_never_fired_as_dead_before_the_window():
    tracker = DeadLatentTracker(3, window=1000, device=torch.device("cpu"))
    tracker.update(torch.tensor([1.0, 0.0, 0.0]), 10)
    tracker.update(torch.tensor([0.0, 2.0, 0.0]), 10)
    assert tracker.dead_F().tolist() == [False, False, True]


def test_calibrator_raises_the_coefficient_while_l0_is_too_high():
    calibrator = SparsityCalibrator(1.0, target_l0=4, device=torch.device("cpu"))
    fires_F = torch.full((10,), 8.0)  # L0 = 80 / 10 rows = 8
    for _ in range(5):
        calibrator.update(fires_F, 10, gain=0.1)
    expected = np.exp(5 * 0.1 * np.log(9 / 5))
    assert float(calibrator.coefficient) == pytest.approx(expected, rel=1e-5)
    for _ in range(200):
        calibrator.update(torch.full((10,), 2.0), 10, gain=0.1)  # L0 = 2: too low
    assert float(calibrator.coefficient) < 1.0


def test_resampling_moves_only_dead_latents_and_resets_their_adam_moments():
    generator = torch.Generator().manual_seed(0)
    module = ReLUModule(4, 6)
    x_BD = torch.randn(32, 4, generator=generator)
    module.initialize(generator, x_BD, x_BD.mean(0))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    module.loss(x_BD).loss.backward()
    optimizer.step()
    dead_F = torch.tensor([True, False, False, True, False, False])
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    assert resample_dead_latents(module, optimizer, dead_F, x_BD, generator) == 2
    alive = ~dead_F
    torch.testing.assert_close(module.W_dec_FD[alive], before["W_dec_FD"][alive])
    torch.testing.assert_close(module.W_enc_DF[:, alive], before["W_enc_DF"][:, alive])
    assert not torch.allclose(module.W_dec_FD[dead_F], before["W_dec_FD"][dead_F])
    torch.testing.assert_close(module.W_dec_FD[dead_F].norm(dim=1), torch.ones(2))
    for moment in ("exp_avg", "exp_avg_sq"):
        assert not optimizer.state[module.W_dec_FD][moment][dead_F].any()
        assert optimizer.state[module.W_dec_FD][moment][alive].any()
    # Centred on the decoder bias, as at initialisation.
    torch.testing.assert_close(
        module.b_enc_F[dead_F], -(module.b_dec_D @ module.W_enc_DF[:, dead_F]).detach()
    )
