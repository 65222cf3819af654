"""Training-recipe pieces on their own, each against a plain reference."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from skSAE._architectures import JumpReLUModule, LossTerms, ReLUModule
from skSAE._recipe import (
    DeadLatentTracker,
    SparsityCalibrator,
    TrainingSchedule,
    TrainingStatistics,
    decay_factor,
    geometric_median,
    resample_dead_latents,
    warmup_factor,
)


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


def schedule_for(module, **overrides):
    options = dict(
        learning_rate=0.1,
        total_steps=10,
        steps_before=0,
        warmup_steps=0,
        sparsity_warmup_steps=0,
        decay_fraction=0.0,
        coefficient=2.0,
        target_l0=None,
        start_coefficient=None,
        device=torch.device("cpu"),
    )
    return TrainingSchedule(module, **{**options, **overrides})


def test_schedule_sets_warmup_and_decay_rates_on_the_optimizer():
    module = ReLUModule(4, 8)
    optimizer = torch.optim.Adam(module.parameters())
    # 2 steps were made by an earlier call: the warm-up continues from there.
    schedule = schedule_for(module, steps_before=2, warmup_steps=4, decay_fraction=0.5)
    rates = []
    for step in range(10):
        schedule.apply(optimizer, step)
        rates.append(optimizer.param_groups[0]["lr"])
    expected = [
        0.1 * warmup_factor(2 + step, 4) * decay_factor(step, 10, 0.5) for step in range(10)
    ]
    np.testing.assert_allclose(rates, expected)
    assert rates[0] == pytest.approx(0.1 * 3 / 4) and rates[-1] == pytest.approx(0.1 / 5)


def test_schedule_warms_the_coefficient_up_then_holds_it():
    module = ReLUModule(4, 8)
    optimizer = torch.optim.Adam(module.parameters())
    schedule = schedule_for(module, sparsity_warmup_steps=4)
    coefficients = []
    for step in range(6):
        schedule.apply(optimizer, step)
        coefficients.append(float(module.sparsity_coefficient))
    np.testing.assert_allclose(coefficients, [0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert schedule.coefficient() == 2.0


def test_schedule_without_coefficient_leaves_it_alone():
    module = ReLUModule(4, 8)
    module.sparsity_coefficient.fill_(7.0)
    schedule = schedule_for(module, coefficient=None, sparsity_warmup_steps=4)
    schedule.apply(torch.optim.Adam(module.parameters()), 0)
    assert float(module.sparsity_coefficient) == 7.0 and schedule.coefficient() is None


def test_schedule_calibrates_the_coefficient_or_the_thresholds():
    relu = ReLUModule(4, 8)
    optimizer = torch.optim.Adam(relu.parameters())
    schedule = schedule_for(relu, target_l0=2.0, start_coefficient=1.0)
    fires_F = torch.full((8,), 6.0)  # L0 of 6 per row on a batch of 8 rows: too dense
    for step in range(5):
        schedule.apply(optimizer, step)
        schedule.observe(fires_F, 8)
    assert schedule.coefficient() > 1.0  # raised towards the target
    schedule.apply(optimizer, 5)
    assert float(relu.sparsity_coefficient) == pytest.approx(schedule.coefficient())
    jump = JumpReLUModule(4, 8, bandwidth=0.1)
    jump.threshold_F.data.fill_(0.5)
    schedule = schedule_for(jump, target_l0=2.0, start_coefficient=1.0)
    schedule.observe(fires_F, 8)
    assert float(jump.threshold_F.detach().min()) > 0.5  # thresholds move, not the coefficient
    assert schedule.coefficient() == pytest.approx(4 * float(jump.threshold_F.detach().mean()) ** 2)


def test_training_statistics_match_a_float64_reference():
    rng = np.random.default_rng(0)
    module = ReLUModule(3, 5)
    batches = [rng.normal(size=(n, 3)) + 2.0 for n in (4, 7, 5)]
    errors = [rng.random() for _ in batches]
    fires = [rng.integers(0, 4, size=5).astype(np.float32) for _ in batches]
    first, second = TrainingStatistics(5, "cpu"), TrainingStatistics(5, "cpu")
    for index, (x, error, fire) in enumerate(zip(batches, errors, fires, strict=True)):
        terms = LossTerms(
            torch.tensor(error + 1.0), torch.tensor(error * len(x)), torch.from_numpy(fire)
        )
        (first if index < 2 else second).update(torch.from_numpy(x).float(), terms)
    first.add(second)
    summary = first.summary(module)
    X = np.concatenate(batches)
    squared_error = sum(error * len(x) for x, error in zip(batches, errors, strict=True))
    variance = ((X - X.mean(axis=0)) ** 2).sum()
    assert summary["finite"] and first.n_rows == 16 and first.n_steps == 3
    assert summary["loss"] == pytest.approx(
        sum((error + 1.0) * len(x) for x, error in zip(batches, errors, strict=True)) / 16
    )
    assert summary["l0"] == pytest.approx(sum(f.sum() for f in fires) / 16)
    assert summary["explained_variance"] == pytest.approx(1 - squared_error / variance, rel=1e-5)
    assert summary["error_ratio"] == pytest.approx(squared_error / variance, rel=1e-5)


def test_training_statistics_keep_the_squared_norm_floor_for_rows_that_vary():
    # Rows far from zero that vary a little (offset 100, spread 0.01): their variance is
    # below 1e-3 of their squared norm, which stays the reference (as before).
    x = 100 + 0.01 * torch.from_numpy(np.random.default_rng(0).normal(size=(64, 3))).float()
    statistics = TrainingStatistics(5, "cpu")
    statistics.update(x, LossTerms(torch.tensor(0.1), torch.tensor(30.0), torch.zeros(5)))
    squared_norm = float(x.double().square().sum())
    summary = statistics.summary(ReLUModule(3, 5))
    assert summary["error_ratio"] == pytest.approx(30.0 / (1e-3 * squared_norm), rel=1e-4)


def test_training_statistics_of_one_row_measure_against_the_training_scale():
    statistics = TrainingStatistics(5, "cpu")
    x = torch.tensor([[3.0, -1.0, 2.0]])
    statistics.update(x, LossTerms(torch.tensor(0.1), torch.tensor(1.5), torch.zeros(5)))
    summary = statistics.summary(ReLUModule(3, 5))
    assert summary["error_ratio"] == pytest.approx(1.5 / 3) and summary["finite"]
    exact = TrainingStatistics(5, "cpu")
    exact.update(x, LossTerms(torch.tensor(0.0), torch.tensor(0.0), torch.zeros(5)))
    assert exact.summary(ReLUModule(3, 5))["explained_variance"] == 1.0


def test_training_statistics_flag_non_finite_weights_and_floor_constant_rows():
    module = ReLUModule(3, 5)
    statistics = TrainingStatistics(5, "cpu")
    x = torch.full((4, 3), 0.1)  # constant rows: zero variance (float64 rounding aside)
    statistics.update(x, LossTerms(torch.tensor(0.1), torch.tensor(1e-6), torch.zeros(5)))
    summary = statistics.summary(module)
    # Against the scale of the training units (4 rows of mean squared norm 3), not
    # divided by zero nor by 1e-3 of their squared norm (a one-row block "diverged").
    assert summary["error_ratio"] == pytest.approx(1e-6 / 12, rel=1e-4)
    assert summary["explained_variance"] == 0.0  # scikit-learn's convention, not -1e10
    with torch.no_grad():
        module.W_enc_DF[0, 0] = float("nan")
    assert not statistics.summary(module)["finite"]
