"""Training-recipe pieces that are not one architecture's maths: pure torch, no sklearn.

Learning-rate and sparsity schedules, the default learning rate, the geometric
median, dead-latent tracking and the sparsity-coefficient calibration of
``target_l0``. Each is small and tested against a plain reference on its own.

Shape suffixes: N rows, B minibatch rows, D n_features, F n_components, A dead latents.
"""

import math

import torch

# batch_size="auto": about this many training rows per optimiser step, i.e. about
# 1000 steps whatever the budget, between these bounds (benchmarks/README.md, "Budget
# sweep": the best cells lie at 500-3000 steps; 50-100 steps lose 0.03-0.2 of held-out
# variance explained).
TOKENS_PER_STEP = 1000
MIN_AUTO_BATCH_SIZE = 128
MAX_AUTO_BATCH_SIZE = 4096
# learning_rate=None: LEARNING_RATE_SCALE / sqrt(steps), the best learning rate of the
# budget sweep as a function of the optimiser steps (3e-2 at 50-100 steps, 1e-2 at
# 200-800, 3e-3 from 1-3k), capped at 1e-2: short fits on the scikit-learn common checks
# rows (a large offset, little spread) diverged at 3e-2 within 2 steps.
LEARNING_RATE_SCALE = 0.3
MAX_DEFAULT_LEARNING_RATE = 1e-2
# ... measured at D=64; wider inputs want less: times (64 / D) ** 0.75 above D=64. At
# D=576 (SmolLM2 block 6, 785 steps of 256 rows) held-out variance explained was 0.917,
# 0.919, 0.919, 0.915 and 0.906 at 1e-3, 1.4e-3, 2e-3, 3.6e-3 and 6e-3 (the D=64 rule:
# 1e-2, 0.889 and 80% dead latents); Adam moves each coordinate by about the rate, so
# a unit-norm decoder row moves by about rate * sqrt(D) per step.
REFERENCE_WIDTH = 64
WIDTH_EXPONENT = 0.75
# A streamed partial_fit resolves its defaults as if the stream held this many tokens.
STREAM_TOKENS = 1_000_000
# Fewer optimiser steps than this and a fit has not converged (the budget sweep: 50
# steps lose about 0.1 of held-out variance explained to the best cell).
MIN_CONVERGED_STEPS = 100
# warmup_steps="auto": a linear warm-up over this fraction of the steps. Measured with
# TopK on two synthetic sets and SmolLM2 (5 seeds; benchmarks/README.md, "Warm-up"):
# 5% gains on all three, 2% loses on the small-data set, 10% is flat on SmolLM2.
AUTO_WARMUP_FRACTION = 0.05


def auto_batch_size(tokens):
    """Rows per step for a run of ``tokens`` training rows (rows times passes).

    The power of two nearest ``tokens / 1000`` (about 1000 optimiser steps), clipped to
    [128, 4096]: small budgets get many small steps, large ones large batches.
    """
    target = max(tokens / TOKENS_PER_STEP, 1.0)
    batch_size = 2 ** round(math.log2(target))
    return int(min(max(batch_size, MIN_AUTO_BATCH_SIZE), MAX_AUTO_BATCH_SIZE))


def stream_steps(tokens):
    """Optimiser steps of a stream of ``tokens`` rows at its auto batch size (977 for 1M)."""
    return math.ceil(tokens / auto_batch_size(tokens))


def auto_warmup_steps(total_steps):
    """Warm-up steps for a run of ``total_steps``: ``round(0.05 * total_steps)``."""
    return round(AUTO_WARMUP_FRACTION * total_steps)


def default_learning_rate(total_steps, n_features):
    """Adam step size for a run of ``total_steps`` optimiser steps on ``n_features`` inputs.

    ``min(0.3 / sqrt(total_steps), 1e-2) * min(1, (64 / n_features) ** 0.75)``: the best
    learning rate of the budget sweep (``benchmarks/README.md``) follows the number of
    steps, hardly the dictionary width (the width rule of Gao et al. 2024 was 9 to 53
    times too low at 50 to 2000 steps), and falls with the input width.
    """
    rate = min(LEARNING_RATE_SCALE / math.sqrt(max(total_steps, 1)), MAX_DEFAULT_LEARNING_RATE)
    return rate * min(1.0, (REFERENCE_WIDTH / n_features) ** WIDTH_EXPONENT)


def warmup_factor(step, warmup_steps):
    """Linear warm-up multiplier at a 0-based ``step``: ``(step + 1) / warmup_steps``, then 1.

    Used for the learning rate and for the sparsity coefficient (Conerly et al.
    2024 warm the L1 coefficient up over the first 5% of training).
    """
    if not warmup_steps or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def decay_factor(step, total_steps, decay_fraction):
    """Learning-rate multiplier for a final linear decay to zero.

    1 until the last ``decay_fraction`` of ``total_steps``, then falling linearly, so
    that the step after the last would be at zero (Conerly et al. 2024 decay over the
    last fifth of training).
    """
    decay_steps = round(decay_fraction * total_steps)
    remaining = total_steps - step
    if decay_steps == 0 or remaining > decay_steps:
        return 1.0
    return remaining / decay_steps


@torch.no_grad()
def geometric_median(x_ND, max_iter=100, tol=1e-7):
    """The point minimising the summed Euclidean distance to the rows (Weiszfeld).

    Parameters
    ----------
    x_ND : torch.Tensor of shape (N, D)
    max_iter : int
        Weiszfeld iterations at most.
    tol : float
        Stop when the point moves less than ``tol`` times the rows' mean norm.

    Returns
    -------
    median_D : torch.Tensor of shape (D,), float32
    """
    x_ND = x_ND.double()
    median_D = x_ND.mean(dim=0)
    scale = float(x_ND.norm(dim=1).mean()) or 1.0
    for _ in range(max_iter):
        # Rows at the current point get a tiny floor, the usual Weiszfeld safeguard.
        weights_N = 1 / (x_ND - median_D).norm(dim=1).clamp_min(1e-12 * scale)
        updated_D = weights_N @ x_ND / weights_N.sum()
        moved = float((updated_D - median_D).norm())
        median_D = updated_D
        if moved < tol * scale:
            break
    return median_D.float()


class DeadLatentTracker:
    """Training rows seen since each latent last fired; dead after ``window`` rows.

    A latent is dead when it has not fired in the last ``min(window, rows_seen)``
    rows: over a short run, "never fired" (Gao et al. 2024 use 10M tokens).
    Updates stay on the device, with no host synchronisation.

    Parameters
    ----------
    n_components : int
    window : int
        Rows without a firing after which a latent counts as dead.
    device : torch.device
    rows_since_fired_F : torch.Tensor or None
        Counts to continue from (a later `partial_fit`); zeros when None.
    rows_seen : int
        Rows seen before, with ``rows_since_fired_F``.
    """

    def __init__(self, n_components, window, device, rows_since_fired_F=None, rows_seen=0):
        self.window = window
        if rows_since_fired_F is None:
            rows_since_fired_F = torch.zeros(n_components, dtype=torch.float64)
        self.rows_since_fired_F = rows_since_fired_F.to(device, torch.float64)
        self.rows_seen = rows_seen

    def update(self, fires_F, n_rows):
        """Record a batch of ``n_rows`` rows; ``fires_F`` counts each latent's firings."""
        self.rows_since_fired_F = torch.where(fires_F > 0, 0.0, self.rows_since_fired_F + n_rows)
        self.rows_seen += n_rows

    def dead_F(self):
        """Boolean mask of the dead latents (none before any row is seen)."""
        if self.rows_seen == 0:
            return torch.zeros_like(self.rows_since_fired_F, dtype=torch.bool)
        return self.rows_since_fired_F >= min(self.window, self.rows_seen)


class SparsityCalibrator:
    """Steers a sparsity coefficient so that the training L0 reaches ``target_l0``.

    Integral control in log space: after each batch, with the error
    ``e = log((L0 + 1) / (target_l0 + 1))`` of the batch L0 smoothed by an exponential
    moving average, ``log c += gain * e``. Adding one keeps the logarithm finite
    at L0 = 0. The caller makes the gain proportional to the learning rate, since the
    weights follow a new coefficient at that pace. All on the device, no host
    synchronisation.

    Parameters
    ----------
    coefficient : float
        Starting coefficient (positive).
    target_l0 : float
    device : torch.device
    smoothing : float
        Weight of the newest batch in the L0 moving average.

    Attributes
    ----------
    error : torch.Tensor of shape () or None
        The smoothed log L0 excess ``e`` after the last update.
    """

    def __init__(self, coefficient, target_l0, device, smoothing=0.1):
        self.log_coefficient = torch.tensor(math.log(max(coefficient, 1e-8)), device=device)
        self.log_target = math.log(target_l0 + 1)
        self.smoothing = smoothing
        self.l0_average = None
        self.error = None

    @property
    def coefficient(self):
        """The current coefficient, a 0-d tensor on the device."""
        return self.log_coefficient.exp()

    def measure(self, fires_F, n_rows):
        """Fold a batch whose latents fired ``fires_F`` times into the smoothed error.

        Returns
        -------
        error : torch.Tensor of shape ()
            ``log((L0 + 1) / (target_l0 + 1))`` of the smoothed L0.
        """
        l0 = fires_F.sum() / n_rows
        if self.l0_average is None:
            self.l0_average = l0.detach().clone()
        else:
            self.l0_average.lerp_(l0, self.smoothing)
        self.error = torch.log1p(self.l0_average) - self.log_target
        return self.error

    def update(self, fires_F, n_rows, gain):
        """`measure` a batch, then move the log-coefficient by ``gain`` times the error."""
        self.log_coefficient += gain * self.measure(fires_F, n_rows)


@torch.no_grad()
def resample_dead_latents(module, optimizer, dead_F, x_BD, generator):
    """Point dead latents at badly reconstructed inputs (Bricken et al. 2023).

    Each dead latent gets, as its decoder row, the direction of the reconstruction
    error of a row of ``x_BD`` drawn with probability proportional to its squared
    error; its encoder column is that direction at 0.2 times the mean norm of the
    live encoder columns, its bias centres it on ``b_dec_D``, and Adam forgets its
    moments.

    Returns
    -------
    n_resampled : int
    """
    dead_A = dead_F.nonzero().flatten()
    if dead_A.numel() == 0:
        return 0
    error_BD = x_BD - module.decode(module.encode(x_BD))
    weights_B = error_BD.square().sum(dim=1).double().cpu()
    if not float(weights_B.sum()) > 0:
        return 0
    rows = torch.multinomial(weights_B, dead_A.numel(), replacement=True, generator=generator)
    directions_AD = error_BD[rows.to(x_BD.device)]
    directions_AD /= directions_AD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive_F = ~dead_F
    encoder_norm_F = module.W_enc_DF.norm(dim=0)
    live_norm = encoder_norm_F[alive_F].mean() if bool(alive_F.any()) else encoder_norm_F.mean()
    decoder_norm = 1.0 if module.unit_norm_decoder else module.W_dec_FD.norm(dim=1).mean()
    module.W_dec_FD[dead_A] = directions_AD * decoder_norm
    module.W_enc_DF[:, dead_A] = directions_AD.T * (0.2 * live_norm)
    module.b_enc_F[dead_A] = -(module.b_dec_D @ module.W_enc_DF[:, dead_A])
    for parameter, dim in ((module.W_dec_FD, 0), (module.W_enc_DF, 1), (module.b_enc_F, 0)):
        for moment in optimizer.state.get(parameter, {}).values():
            if moment.dim() > 0:  # exp_avg, exp_avg_sq; not the step count
                moment.index_fill_(dim, dead_A, 0.0)
    return int(dead_A.numel())


class TrainingSchedule:
    """The learning rate and the sparsity coefficient of each step of one training call.

    Learning-rate warm-up (over all the steps made so far) and final decay (over this
    call); sparsity warm-up; and the ``target_l0`` calibration, whose gain follows the
    learning rate. Sets them on the optimizer and the module without host
    synchronisation.

    Parameters
    ----------
    module : SparseAutoencoderModule
        The module being trained; its ``sparsity_coefficient`` buffer is set here.
    learning_rate : float
        Base Adam step size.
    total_steps : int
        Steps of this call.
    steps_before : int
        Steps made by earlier calls (warm-ups count from the first step ever).
    warmup_steps, sparsity_warmup_steps : int
        Lengths of the linear warm-ups.
    decay_fraction : float
        Final fraction of this call's steps with a linear decay to zero (0: none).
    coefficient : float or None
        The sparsity coefficient parameter, None when the module has none.
    target_l0 : float or None
        Calibrate the coefficient (or the thresholds) towards this L0.
    start_coefficient : float or None
        Where the calibration starts: the coefficient reached so far.
    device : torch.device
    """

    def __init__(
        self,
        module,
        *,
        learning_rate,
        total_steps,
        steps_before,
        warmup_steps,
        sparsity_warmup_steps,
        decay_fraction,
        coefficient,
        target_l0,
        start_coefficient,
        device,
    ):
        self.module = module
        self.base_lr = learning_rate
        self.lr = learning_rate
        self.total_steps = total_steps
        self.steps_before = steps_before
        self.warmup_steps = warmup_steps
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self.decay_fraction = decay_fraction
        self.base_coefficient = coefficient
        self.calibrator = None
        if coefficient is not None and target_l0 is not None:
            self.calibrator = SparsityCalibrator(start_coefficient, target_l0, device)
        # A calibrated coefficient is set each step by `apply`, or, for thresholds
        # calibrated directly, kept at their equilibrium by the module.
        if coefficient is not None and self.calibrator is None:
            module.sparsity_coefficient.fill_(coefficient)

    def apply(self, optimizer, step):
        """Set the rate and coefficient of this call's 0-based ``step``."""
        done = self.steps_before + step
        factor = warmup_factor(done, self.warmup_steps)
        factor *= decay_factor(step, self.total_steps, self.decay_fraction)
        self.lr = self.base_lr * factor
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        warm = warmup_factor(done, self.sparsity_warmup_steps)
        module = self.module
        if self.calibrator is not None and not module.calibrates_thresholds:
            module.sparsity_coefficient.copy_(self.calibrator.coefficient * warm)
        elif self.base_coefficient is not None and done <= self.sparsity_warmup_steps:
            module.sparsity_coefficient.fill_(self.base_coefficient * warm)

    def observe(self, fires_F, n_rows):
        """Let the calibration see the L0 of the batch just trained on."""
        if self.calibrator is None:
            return
        if self.module.calibrates_thresholds:
            self.module.nudge_thresholds(self.calibrator.measure(fires_F, n_rows))
        else:
            gain = min(self.module.calibration_gain * self.lr, self.module.max_calibration_step)
            self.calibrator.update(fires_F, n_rows, gain)
            self.module.nudge_toward_l0(self.calibrator.error)

    def coefficient(self):
        """The coefficient reached (a Python float), or None without a coefficient."""
        if self.base_coefficient is None:
            return None
        if self.calibrator is None:
            return float(self.base_coefficient)
        if self.module.calibrates_thresholds:
            return float(self.module.sparsity_coefficient)
        return float(self.calibrator.coefficient)


class TrainingStatistics:
    """Device-side running sums over training batches; read (one sync) only at checks.

    Parameters
    ----------
    n_components : int
    device : torch.device
    """

    def __init__(self, n_components, device):
        self.fires_F = torch.zeros(n_components, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.squared_error = torch.zeros((), dtype=torch.float64, device=device)
        self.x_sum_D = None
        self.x_squares = torch.zeros((), dtype=torch.float64, device=device)
        self.n_rows = 0
        self.n_steps = 0

    def update(self, x_BD, terms):
        """Add a batch and its `LossTerms`."""
        self.fires_F += terms.fires_F
        self.loss_sum += terms.loss.detach() * x_BD.shape[0]
        self.squared_error += terms.squared_error
        x_sum_D = x_BD.sum(dim=0, dtype=torch.float64)
        self.x_sum_D = x_sum_D if self.x_sum_D is None else self.x_sum_D + x_sum_D
        self.x_squares += x_BD.square().sum(dtype=torch.float64)
        self.n_rows += x_BD.shape[0]
        self.n_steps += 1

    def add(self, other):
        """Fold another `TrainingStatistics` into this one (on the device, no sync)."""
        self.fires_F += other.fires_F
        self.loss_sum += other.loss_sum
        self.squared_error += other.squared_error
        if other.x_sum_D is not None:
            self.x_sum_D = other.x_sum_D if self.x_sum_D is None else self.x_sum_D + other.x_sum_D
        self.x_squares += other.x_squares
        self.n_rows += other.n_rows
        self.n_steps += other.n_steps

    def reduce(self, all_reduce):
        """Sum the statistics over the ranks of a data-parallel fit (``all_reduce`` in place)."""
        counts = torch.tensor([self.n_rows], dtype=torch.float64, device=self.loss_sum.device)
        for tensor in (self.fires_F, self.loss_sum, self.squared_error, self.x_squares, counts):
            all_reduce(tensor)
        if self.x_sum_D is None:
            raise ValueError("reduce needs at least one batch on every rank")
        all_reduce(self.x_sum_D)
        self.n_rows = int(counts.item())

    def summary(self, module):
        """Python floats of the batches so far (one sync; at least one batch).

        Returns
        -------
        summary : dict
            ``"finite"`` (loss and every parameter of ``module`` finite), ``"loss"``
            (mean per row), ``"l0"``, ``"explained_variance"`` and ``"error_ratio"``:
            the squared error over the variance of the rows (floored at 1e-3 times
            their squared norm, so constant rows give no huge ratio); a useful model
            stays near or below 1. Rows that do not vary (a single row, or identical
            rows) have no variance to measure against: their explained variance is
            1.0 for an exact reconstruction and 0.0 otherwise (scikit-learn's
            convention for constant targets), and their error ratio is taken against
            the scale of the training normalisation, in which rows have a mean
            squared norm of n_features.
        """
        finite = torch.isfinite(self.loss_sum)
        for parameter in module.parameters():
            finite = finite & torch.isfinite(parameter).all()
        total = self.x_squares - self.x_sum_D.square().sum() / self.n_rows
        # Identical rows leave only float64 rounding in `total` (about 1e-11 of the
        # squared norm at a million rows), which would give an explained variance of
        # -1e15 and a "divergence" of any imperfect model on a one-row block.
        steady = total <= 1e-6 * self.x_squares
        reference = torch.maximum(total, 1e-3 * self.x_squares)
        reference = torch.where(
            steady, torch.clamp_min(reference, float(self.n_rows * self.x_sum_D.numel())), reference
        )
        explained = torch.where(
            steady,
            (self.squared_error == 0).double(),
            1 - self.squared_error / total.clamp_min(1e-30),
        )
        values = torch.stack(
            [
                finite.double(),
                self.loss_sum / self.n_rows,
                self.fires_F.sum().double() / self.n_rows,
                explained,
                self.squared_error / reference.clamp_min(1e-30),
            ]
        ).tolist()
        return {
            "finite": bool(values[0]),
            "loss": values[1],
            "l0": values[2],
            "explained_variance": values[3],
            "error_ratio": values[4],
        }
