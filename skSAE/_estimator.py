"""`SparseAutoencoder`: the scikit-learn estimator around the torch modules.

This module is sklearn glue: parameters, validation, the fit/partial_fit loops, the
NumPy <-> torch hand-over and pickling. The maths lives in `_architectures`, the
schedules and running statistics in `_recipe`, and the data readers in `_data`.

Shape suffixes: N rows of X, B minibatch rows, H rows of a chunk, D n_features,
F n_components, A dead latents, Z non-zero codes of a block.
"""

import copy
import math
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ._architectures import (
    ARCHITECTURES,
    LossTerms,
    build_module,
    l0_sample_rows,
    to_training_units,
    to_user_units,
)
from ._array_metrics import ExplainedVarianceAccumulator
from ._checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointMismatchError,
    CheckpointWriteError,
    check_fingerprint,
    checkpoint_lock,
    fingerprint_params,
    from_plain,
    read_checkpoint,
    to_plain,
    write_checkpoint,
)
from ._data import CHUNK_BYTES, validated_data
from ._distributed import FIRST_ROWS_COMPARED, DataParallel, data_parallel
from ._recipe import (
    MIN_CONVERGED_STEPS,
    STREAM_TOKENS,
    DeadLatentTracker,
    TrainingSchedule,
    TrainingStatistics,
    auto_batch_size,
    auto_warmup_steps,
    default_learning_rate,
    geometric_median,
    resample_dead_latents,
    stream_steps,
)
from ._sklearn_compat import (
    HasMethods,
    Interval,
    StrOptions,
    _fit_context,
    validate_parameter_constraints,
)
from ._sparse_coding import (
    DICTIONARY_ALGORITHMS,
    calibrate_alpha,
    encode_block,
    prepare_dictionary,
)
from ._utils import resolve_device, to_numpy, torch_generator
from ._validation import invalid_parameter
from ._version import __version__, pop_saved_version

# Steps between the loop's only host/device synchronisations: a check of the loss and
# weights (to stop a diverging run), of the dead latents, and the progress-bar refresh.
_CHECK_EVERY = 32
# A squared reconstruction error this many times the variance of the rows means
# divergence, even while finite: a model that predicts the mean has ratio 1 (measured
# at learning_rate=10 on the tests' synthetic rows: 25 for relu to 870 within 32
# steps; NaN for gated).
_DIVERGED_ERROR_RATIO = 10.0
# Rows used to estimate the input scale and mean at initialisation.
_INIT_SAMPLE_ROWS = 65_536
# Rows of X on which `transform_alpha=None` is calibrated (lasso_lars solves them 10
# times in its bisection).
_CALIBRATION_ROWS = 128

# Module state names and the fitted attributes that hold them (in the user's units).
_PUBLIC_NAMES = {
    "W_enc_DF": "W_enc_",
    "b_enc_F": "b_enc_",
    "W_dec_FD": "components_",
    "b_dec_D": "b_dec_",
    "threshold": "threshold_",
}
# The inference options, read at each transform; a model pickled before they existed
# loads with these.
_INFERENCE_DEFAULTS = {
    "transform_algorithm": "encoder",
    "transform_n_nonzero_coefs": None,
    "transform_alpha": None,
}
# Private torch objects: rebuilt from the NumPy state, never pickled or restored.
_RUNTIME_STATE = ("_module", "_optimizer", "_generator", "_compiled_loss")
# Kept through a failed call (a refused block leaves the replay where it was), never
# pickled or checkpointed.
_NOT_SAVED = (*_RUNTIME_STATE, "_checkpoint_replay")


def inference_module(sae, device):
    """A frozen torch module of a fitted SAE, in the user's units, on ``device``.

    For package code that runs the SAE inside a model's forward pass (splices,
    steering, top activations): ``module.encode(x_ND)`` and ``module.decode(codes_NF)``
    equal `SparseAutoencoder.transform` and `SparseAutoencoder.inverse_transform` with
    ``transform_algorithm="encoder"``. The module is always the encoder: a caller that
    must follow another `transform_algorithm` (loss recovered) calls `transform`.
    """
    return sae._inference_module(device)


def check_input_width(sae, activations):
    """Raise a ValueError unless the activations' last axis is the SAE's input width."""
    width = activations.shape[-1]
    if width != sae.n_features_in_:
        raise ValueError(
            f"The hook gives {width} features, but the SAE was fitted on "
            f"{sae.n_features_in_}; fit it on this extractor's activations."
        )


class TrainingDivergedError(ValueError):
    """Training diverged (NaN/inf, or an exploding error); good weights are kept.

    Attributes
    ----------
    kept_weights : bool
        Whether the estimator holds weights trained by the failed call (those of its
        last good check); when false it was left as it was before the call.
    """

    def __init__(self, message, kept_weights=False):
        super().__init__(message)
        self.kept_weights = kept_weights


class TrainingInterruptedWarning(UserWarning):
    """Training was interrupted (`KeyboardInterrupt`); the weights trained so far are kept."""


class SparseAutoencoder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Sparse autoencoder: an overcomplete, sparse dictionary of activation vectors.

    Learns ``codes = act(X @ W_enc_ + b_enc_)`` and ``X_hat = codes @ components_ + b_dec_``
    by minimising the squared reconstruction error plus a sparsity pressure, with Adam
    in torch on a GPU when present and on the CPU otherwise.

    Parameters
    ----------
    n_components : int, default=None
        Number of latents (dictionary size). ``None`` means
        ``round(expansion_factor * n_features_in_)``.
    expansion_factor : float, default=8
        Dictionary size relative to the input width, used when ``n_components=None``.
    architecture : {"topk", "batchtopk", "matryoshka", "jumprelu", "gated", "relu"}, \
            default="topk"
        ``"topk"`` keeps the ``k`` largest pre-activations of each row (Gao et al. 2024);
        ``"batchtopk"`` keeps the ``k * batch`` largest of a training batch and, at
        inference, every pre-activation above the learned `threshold_` (Bussmann et al.
        2024); ``"matryoshka"`` is BatchTopK trained so that every prefix in
        `prefix_sizes` of the dictionary reconstructs on its own (Bussmann et al.
        2025); ``"jumprelu"`` learns one threshold per latent under an L0 penalty
        (Rajamanoharan et al. 2024b); ``"gated"`` has separate gate and magnitude
        paths under an L1 penalty (Rajamanoharan et al. 2024a) and is stored as the
        JumpReLU it equals; ``"relu"`` uses ReLU codes with an L1 penalty (Bricken et
        al. 2023).
    k : int, default=32
        Active latents per row (at most for ``"topk"``, on average for
        ``"batchtopk"`` and ``"matryoshka"``; all latents when ``k >= n_components``).
        Only used by those three architectures.
    l1_coefficient : float, default=1.0
        Weight of the L1 penalty on the codes, in the normalised units the model trains
        in (see Notes). Only used when ``architecture`` is ``"relu"`` or ``"gated"``.
    l0_coefficient : float, default=1.0
        Weight of the L0 penalty, in training units: a code is kept when it is worth
        more than about ``sqrt(l0_coefficient) / 2``, where the thresholds start (their
        measured equilibrium). Only used when ``architecture="jumprelu"``.
    target_l0 : float, default=None
        When set, the sparsity coefficient (`l1_coefficient` or `l0_coefficient`,
        which then only give the starting value) is calibrated during training so that
        the mean L0 reaches ``target_l0``; the result is `sparsity_coefficient_`. Only
        used by ``"relu"``, ``"gated"`` and ``"jumprelu"``.
    bandwidth : float, default=0.1
        Kernel width of JumpReLU's straight-through estimators, in training units.
        Only used when ``architecture="jumprelu"``.
    prefix_sizes : array-like of int, default=None
        Increasing dictionary prefix lengths that must each reconstruct; the last is
        ``n_components`` (appended when missing). ``None`` means
        ``n_components // 2**j`` for ``j = 4, ..., 0``. Only used when
        ``architecture="matryoshka"``.
    decoder_constraint : {"unit_norm", "free"}, default="unit_norm"
        ``"unit_norm"`` keeps decoder rows at unit norm; ``"free"`` leaves them free,
        starts them at norm 1 and weights each code's L1 by its decoder norm
        (Conerly et al. 2024). Either way `components_` has unit rows: the norms are
        folded into the encoder. Only used when ``architecture="relu"``.
    with_mean : bool, default=False
        Subtract the training mean before scaling (see Notes). The mean is folded into
        the biases, so results stay in the units of ``X``.
    decoder_bias_init : {"mean", "geometric_median"}, default="mean"
        Starting point of `b_dec_`, computed on up to 65,536 training rows.
    learning_rate : float, default=None
        Adam step size. ``None`` means ``min(0.3 / sqrt(steps), 1e-2)`` for the optimiser
        steps the fit will make (``max_iter * ceil(n_samples / batch_size_)``), times
        ``(64 / n_features_in_) ** 0.75`` for inputs wider than 64: at 64 features
        1e-2 up to 900 steps and 3e-3 at 10,000; at 576, 1.9e-3 at 790 steps. In
        `partial_fit` the steps are all those made so far including the call's, and
        at least 977 (a stream of 1M rows), so the rate falls as a stream goes on. The
        value used is `learning_rate_`.
    warmup_steps : int or "auto", default="auto"
        Steps of linear learning-rate warm-up at the start of training. ``"auto"``
        means 5% of the optimiser steps of a `fit` (of the ~1000 steps of a stream of
        1M rows in `partial_fit`, resolved at its first call), and none for a fixed L1
        coefficient (``"relu"`` and ``"gated"`` without `target_l0`), where it loses;
        the value used is `warmup_steps_`.
    decay_fraction : float, default=0.2
        Fraction of the steps of each `fit` over which the learning rate decays
        linearly to zero at the end (Conerly et al. 2024). `partial_fit` never decays.
    sparsity_warmup_steps : int, default=0
        Steps over which the sparsity coefficient grows linearly from zero.
    max_grad_norm : float, default=None
        Clip the gradient's global norm to this value before each step.
    dead_window : int, default=1_000_000
        A latent that has not fired in the last `dead_window` training rows (in `fit`,
        at most one pass over ``X``; never more than the rows seen) is dead: it counts
        in `dead_fraction_`, gets the AuxK loss and, with `resample_dead`, is
        resampled.
    aux_coefficient : float, default=1/32
        Weight of the AuxK loss (Gao et al. 2024), which trains the dead latents to
        reconstruct the remaining error. Only used by ``"topk"``, ``"batchtopk"`` and
        ``"matryoshka"``; 0 switches it off.
    resample_dead : bool, default=False
        Re-initialise dead latents towards badly reconstructed rows (Bricken et al.
        2023), checked every 32 steps. Only used when ``architecture="relu"``.
    batch_size : int or "auto", default="auto"
        Rows per optimisation step (at most ``n_samples``). ``"auto"`` sizes the batch
        to the budget, ``n_samples * max_iter`` rows seen: the power of two nearest
        1/1000 of it (about 1000 optimiser steps), between 128 and 4096. In
        `partial_fit` the budget is unknown and taken as 1,000,000 rows (1024 a batch)
        at the first call, whose value is kept. The value used is `batch_size_`.
    max_iter : int, default=10
        Passes over ``X`` made by `fit`.
    mixed_precision : bool, default=False
        Run the training forward pass under bfloat16 autocast (weights and Adam stay
        float32). Faster on recent GPUs; on a CPU it is usually slower.
    compile : bool, default=False
        Compile the training loss with `torch.compile` (needs a C++ compiler on the
        CPU; the first steps are slow while it compiles).
    device : str, default="auto"
        Torch device for training and inference: ``"auto"`` (CUDA when available),
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``. Resolved at each call, so a model
        moves between devices by `set_params` without refitting.
    random_state : int, RandomState instance or None, default=None
        Seeds the initialisation and the shuffling. Same seed, same device: same model.
    verbose : int or bool, default=0
        Show a progress bar (on stdout) with the loss, L0 and variance explained.
    warm_start : bool, default=False
        When true, `fit` continues from the current weights (and optimizer state) instead
        of starting again.
    sparse_output : bool, default=False
        When true, `transform` returns a `scipy.sparse.csr_matrix`.
    transform_algorithm : {"encoder", "omp", "lasso_lars", "threshold"}, \
            default="encoder"
        How `transform` (and so `score`) codes ``X``. ``"encoder"`` is the SAE's own
        encoder, ``act(X @ W_enc_ + b_enc_)``. The others, as in
        `sklearn.decomposition.SparseCoder`, solve ``X - b_dec_ ~= codes @ components_``
        for each row with `sklearn.decomposition.sparse_encode` on the learned
        dictionary (its rows scaled to unit norm for the solver, the codes scaled back,
        so that `inverse_transform` reconstructs): ``"omp"``, orthogonal matching
        pursuit with `transform_n_nonzero_coefs` atoms a row; ``"lasso_lars"``, the
        Lasso solution on the unit rows, ``argmin 0.5 * ||x - b_dec_ - codes @
        components_||^2 + transform_alpha * sum_f ||components_[f]|| |codes_f|``;
        ``"threshold"``, the correlations with the unit rows soft-thresholded at
        `transform_alpha`. Their codes may be negative (the solvers are unconstrained,
        as scikit-learn's default), they run on the CPU in float64 whatever `device`,
        and they are much slower than the encoder. Set it on a fitted model to compare
        its encoder with a proper sparse solver on the same dictionary (the amortisation
        gap, `skSAE.evaluation.amortisation_gap`). `fit` and `partial_fit` ignore it:
        training always uses the encoder.
    transform_n_nonzero_coefs : int, default=None
        Non-zero codes a row for ``transform_algorithm="omp"`` (ignored otherwise).
        ``None`` means the model's own L0: ``k`` as fitted for ``"topk"``,
        ``"batchtopk"`` and ``"matryoshka"``, otherwise the encoder's mean L0 on the
        ``X`` being transformed (rounded, at least 1), computed in a first pass over it;
        at most ``n_features_in_`` either way, since OMP's residual is zero by then.
        With that second rule a row's code depends on the other rows of ``X``: pass
        a number to code rows independently.
    transform_alpha : float, default=None
        The L1 penalty of ``transform_algorithm="lasso_lars"`` or the threshold of
        ``"threshold"`` (ignored otherwise), in the units of ``X`` (of a correlation
        with a unit decoder row). ``None`` means the value at which the algorithm
        gives the model's own L0 (as for `transform_n_nonzero_coefs`) on average over
        up to 128 rows of ``X`` (drawn with a fixed seed; a contiguous block of an
        `h5py.Dataset` or `numpy.memmap`): the quantile of the correlations for
        ``"threshold"``, a 10-step bisection for ``"lasso_lars"``. Again a row's code
        then depends on ``X``: pass a number to code rows independently.
    checkpoint_path : str or path-like, default=None
        A file where training keeps its full state (weights, Adam moments, schedule
        and calibration, dead-latent counters, random states, position in the pass),
        written atomically every `checkpoint_every` steps. Running the same `fit` again
        after a crash (or a Ctrl-C) continues from it, and ends with the model an
        uninterrupted run makes; a checkpoint of other data (every row is hashed) or
        other parameters is refused, and so is a file damaged after it was written (it
        carries the SHA-256 of its content). One process at a time trains with a path
        (a lock file beside it, held during each `fit` or `partial_fit` call); a second
        is refused with `CheckpointInUseError`. When a checkpoint cannot be written (a
        full disk), training stops with `CheckpointWriteError` (an `OSError`): the
        previous checkpoint is whole, and the estimator keeps the model trained so far.
        `fit` removes the file when it completes. A loop of `partial_fit`
        calls shares one file: rerun on a new estimator with the same blocks in the
        same order, the calls the file holds return at once (each block checked
        against the one it recorded), the call it stopped in continues where it
        left off, and the rest train. The first replayed call loads the state the file
        holds, so until the replay ends the estimator is already as after the last
        call recorded. The file stays after the last call; delete it to train again
        from the start.
    checkpoint_every : int, default=1000
        Steps between checkpoints (written at the first progress check, every 32 steps
        and at the end of each pass or `partial_fit` call, on or after each multiple).
        Only used with `checkpoint_path`.
    logger : object with ``log(metrics, step)``, default=None
        Receives the training metrics at every progress check (loss, L0, explained
        variance, dead fraction, learning rate, sparsity coefficient), where the loop
        already reads them: `skSAE.logging.TensorBoardLogger`,
        `skSAE.logging.WandbLogger`, or your own.

    Attributes
    ----------
    W_enc_ : ndarray of shape (n_features, n_components)
        Encoder weights.
    b_enc_ : ndarray of shape (n_components,)
        Encoder bias.
    components_ : ndarray of shape (n_components, n_features)
        Decoder directions, one unit-norm row per latent.
    b_dec_ : ndarray of shape (n_features,)
        Decoder bias: the reconstruction of an all-zero code.
    threshold_ : ndarray of shape () or (n_components,)
        Codes are kept where the pre-activation exceeds it: one value for
        ``"batchtopk"`` and ``"matryoshka"`` (set at the end of each training call so
        that a sample of its rows, about 4 million pre-activations, keeps ``k`` codes
        per row on average), one per latent for ``"jumprelu"`` and ``"gated"``.
        Absent for the other architectures.
    input_scale_ : float
        Factor the inputs were multiplied by in training so that their mean squared norm
        (after centring, with `with_mean`) equals ``n_features_in_``.
    input_mean_ : ndarray of shape (n_features,)
        Mean subtracted in training (zeros unless `with_mean`). Both are already
        folded into the attributes above.
    sparsity_coefficient_ : float
        The L1 or L0 coefficient at the end of training, after calibration to
        `target_l0` when set (only for ``"relu"``, ``"gated"`` and ``"jumprelu"``).
    latent_frequency_ : ndarray of shape (n_components,)
        Fraction of the rows of the last training pass on which each latent fired.
    dead_fraction_ : float
        Fraction of latents that are dead at the end of training (see `dead_window`).
    loss_curve_ : list of float
        Mean training loss of each pass, in normalised units.
    batch_size_ : int
        Rows per optimisation step of the last training call (`batch_size` resolved).
    learning_rate_ : float
        Base Adam step size of the last training call (`learning_rate` resolved).
    warmup_steps_ : int
        Warm-up steps of the last training call (`warmup_steps` resolved).
    n_iter_ : int
        Passes over the data completed by the weights held.
    n_steps_ : int
        Optimisation steps that made the weights held.
    n_features_in_ : int
        Number of features seen during `fit`.
    feature_names_in_ : ndarray of shape (n_features,)
        Names of features seen during `fit`, when ``X`` has string column names.
    metadata_ : dict
        Only on models read by `skSAE.io.load`: what the file records about the model
        and hook the SAE was trained on (``model_name``, ``hook_name``, ...; see
        `ActivationExtractor.from_metadata`). Absent otherwise.

    See Also
    --------
    sklearn.decomposition.MiniBatchDictionaryLearning : Sparse coding with a fixed solver.

    Notes
    -----
    Parameters are read when `fit` or `partial_fit` starts. What they make of the
    model (the architecture, ``k``, `prefix_sizes`, `decoder_constraint`,
    `bandwidth`) is frozen into the fitted model, so `set_params` after fitting never
    changes the codes of the model held: `fit` builds a new model with the new
    values, and `partial_fit` continues the fitted weights with them (rebuilding the
    torch module, with a fresh Adam state, when one of them changed; the dictionary
    size and the input normalisation stay those of the first call). With
    `warm_start`, `fit` continues the weights when the architecture is unchanged and
    starts a new model when it changed. `device` and `sparse_output` are read at
    every call.

    `transform_algorithm`, `transform_n_nonzero_coefs` and `transform_alpha` are the
    exception to the rule that fitted behaviour is frozen at fit: like the
    ``transform_*`` parameters of `sklearn.decomposition.MiniBatchDictionaryLearning`
    they are inference options read at every `transform` and `score`, so
    ``sae.set_params(transform_algorithm="omp")`` changes the codes of the fitted
    model, without refitting. With ``None`` for the number of atoms or ``alpha``, the
    value is resolved at each call from the ``X`` it gets (see the parameters), so two
    calls on different data may use different values:
    `skSAE.evaluation.amortisation_gap` resolves them once for all its chunks.

    Interrupting training (Ctrl-C, `KeyboardInterrupt`) keeps the weights trained so
    far: the call stops, warns with `TrainingInterruptedWarning` and returns the
    fitted estimator, as `MLPClassifier` does. An interrupt before the call's first
    step leaves the estimator as it was and is re-raised.

    Training normalisation: inputs are mapped to ``(X - input_mean_) * input_scale_``,
    whose mean squared norm is ``n_features_in_``; the loss is the squared error
    summed over features and averaged over rows, plus the sparsity penalty. After
    training the normalisation is folded into the biases, thresholds and codes, so
    `transform`, `inverse_transform` and every attribute are in the units of ``X``.

    Every architecture's `transform` is ``act(X @ W_enc_ + b_enc_)`` row by row, with
    ``act`` ReLU, top-k, or ``z * (z > threshold_)``; `inverse_transform` of the codes
    is the reconstruction trained on.

    Unit-norm decoder rows are kept so by removing the gradient component along each
    row before the Adam step and renormalising after it.

    ``X`` may be a NumPy array, a torch tensor on any device, an `h5py.Dataset` or a
    `numpy.memmap`; the last two are read in chunks (blocks in random order, rows
    shuffled within each), never loaded whole. Unpickled models continue
    `partial_fit` with a fresh Adam state.

    References
    ----------
    Bricken et al. (2023), "Towards Monosemanticity", Transformer Circuits Thread.
    Conerly et al. (2024), "Circuits Updates - April 2024", Transformer Circuits Thread.
    Gao et al. (2024), "Scaling and evaluating sparse autoencoders", arXiv:2406.04093.
    Rajamanoharan et al. (2024a), "Improving dictionary learning with gated sparse
    autoencoders", arXiv:2404.16014.
    Rajamanoharan et al. (2024b), "Jumping ahead: improving reconstruction fidelity
    with JumpReLU sparse autoencoders", arXiv:2407.14435.
    Bussmann et al. (2024), "BatchTopK sparse autoencoders", arXiv:2412.06410.
    Bussmann et al. (2025), "Learning multi-level features with Matryoshka sparse
    autoencoders", arXiv:2503.17547.

    Examples
    --------
    >>> import numpy as np
    >>> from skSAE import SparseAutoencoder
    >>> X = np.random.default_rng(0).normal(size=(256, 16))
    >>> sae = SparseAutoencoder(n_components=64, k=4, max_iter=2, random_state=0).fit(X)
    >>> codes = sae.transform(X)
    >>> codes.shape, bool(((codes > 0).sum(axis=1) <= 4).all())
    ((256, 64), True)
    >>> sae.inverse_transform(codes).shape
    (256, 16)
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "expansion_factor": [Interval(Real, 0, None, closed="neither")],
        "architecture": [StrOptions(set(ARCHITECTURES))],
        "k": [Interval(Integral, 1, None, closed="left")],
        "l1_coefficient": [Interval(Real, 0, None, closed="left")],
        "l0_coefficient": [Interval(Real, 0, None, closed="left")],
        "target_l0": [Interval(Real, 0, None, closed="neither"), None],
        "bandwidth": [Interval(Real, 0, None, closed="neither")],
        "prefix_sizes": ["array-like", None],
        "decoder_constraint": [StrOptions({"unit_norm", "free"})],
        "with_mean": ["boolean"],
        "decoder_bias_init": [StrOptions({"mean", "geometric_median"})],
        "learning_rate": [Interval(Real, 0, None, closed="neither"), None],
        "warmup_steps": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
        "decay_fraction": [Interval(Real, 0, 1, closed="both")],
        "sparsity_warmup_steps": [Interval(Integral, 0, None, closed="left")],
        "max_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "dead_window": [Interval(Integral, 1, None, closed="left")],
        "aux_coefficient": [Interval(Real, 0, None, closed="left")],
        "resample_dead": ["boolean"],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "mixed_precision": ["boolean"],
        "compile": ["boolean"],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "sparse_output": ["boolean"],
        "transform_algorithm": [StrOptions({"encoder", *DICTIONARY_ALGORITHMS})],
        "transform_n_nonzero_coefs": [Interval(Integral, 1, None, closed="left"), None],
        "transform_alpha": [Interval(Real, 0, None, closed="left"), None],
        "checkpoint_path": [str, os.PathLike, None],
        "checkpoint_every": [Interval(Integral, 1, None, closed="left")],
        "logger": [None, HasMethods(["log"])],
    }

    def __init__(
        self,
        n_components=None,
        *,
        expansion_factor=8,
        architecture="topk",
        k=32,
        l1_coefficient=1.0,
        l0_coefficient=1.0,
        target_l0=None,
        bandwidth=0.1,
        prefix_sizes=None,
        decoder_constraint="unit_norm",
        with_mean=False,
        decoder_bias_init="mean",
        learning_rate=None,
        warmup_steps="auto",
        decay_fraction=0.2,
        sparsity_warmup_steps=0,
        max_grad_norm=None,
        dead_window=1_000_000,
        aux_coefficient=1 / 32,
        resample_dead=False,
        batch_size="auto",
        max_iter=10,
        mixed_precision=False,
        compile=False,
        device="auto",
        random_state=None,
        verbose=0,
        warm_start=False,
        sparse_output=False,
        transform_algorithm="encoder",
        transform_n_nonzero_coefs=None,
        transform_alpha=None,
        checkpoint_path=None,
        checkpoint_every=1000,
        logger=None,
    ):
        self.n_components = n_components
        self.expansion_factor = expansion_factor
        self.architecture = architecture
        self.k = k
        self.l1_coefficient = l1_coefficient
        self.l0_coefficient = l0_coefficient
        self.target_l0 = target_l0
        self.bandwidth = bandwidth
        self.prefix_sizes = prefix_sizes
        self.decoder_constraint = decoder_constraint
        self.with_mean = with_mean
        self.decoder_bias_init = decoder_bias_init
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps
        self.decay_fraction = decay_fraction
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self.max_grad_norm = max_grad_norm
        self.dead_window = dead_window
        self.aux_coefficient = aux_coefficient
        self.resample_dead = resample_dead
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.mixed_precision = mixed_precision
        self.compile = compile
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.sparse_output = sparse_output
        self.transform_algorithm = transform_algorithm
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.transform_alpha = transform_alpha
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.logger = logger

    # ------------------------------------------------------------------ fitting

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Train the autoencoder for `max_iter` passes over ``X``.

        Parameters
        ----------
        X : array-like, torch.Tensor, h5py.Dataset or numpy.memmap of shape (n_samples, n_features)
            Activations, one row per token.
        y : None
            Ignored.

        Returns
        -------
        self : SparseAutoencoder
            The fitted estimator.

        Raises
        ------
        TrainingDivergedError
            A `ValueError` raised when the loss or the weights become NaN/inf, or the
            squared reconstruction error exceeds 10 times the variance of the rows.
            The weights of the last good check are kept; when no step was good, the
            estimator is left as it was.

        Warns
        -----
        TrainingInterruptedWarning
            When interrupted (Ctrl-C): the weights trained so far are kept.
        sklearn.exceptions.ConvergenceWarning
            When the last pass explains less variance than the first steps did and
            less than predicting the mean.
        """
        continuing = self.warm_start and self._is_fitted()
        with self._restore_state_on_error():
            device = _training_device(self.device)
            data = validated_data(self, X, reset=not continuing, device=device)
            if not continuing or self._fit_architecture != self.architecture:
                self._initialize(data, device)
            with self._checkpoint_lock():
                self._train(data, n_epochs=self.max_iter, device=device, whole_fit=True)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Make one pass over ``X``, initialising the model on the first call.

        Use it to train on data that never fits in memory, one block at a time (see
        `skSAE.cache.iter_chunks`). Later calls keep the input scale, the random state
        and the Adam state of the earlier ones.

        Parameters
        ----------
        X : array-like, torch.Tensor, h5py.Dataset or numpy.memmap of shape (n_samples, n_features)
            A block of activations.
        y : None
            Ignored.

        Returns
        -------
        self : SparseAutoencoder
            The updated estimator.

        Raises
        ------
        TrainingDivergedError
            As in `fit`.

        Warns
        -----
        TrainingInterruptedWarning, sklearn.exceptions.ConvergenceWarning
            As in `fit`.
        """
        first_call = not self._is_fitted()
        if not first_call:
            # _fit_context validates only a first partial_fit, but later calls act on
            # parameters changed since (k, architecture, ...): check them too.
            self._validate_params()
        done, in_progress = False, None
        if not first_call:
            # Checks only, before anything changes: a refused block leaves the model,
            # its Adam state and its replay as they were.
            device = _training_device(self.device)
            data = validated_data(self, X, reset=False, device=device)
            if self.checkpoint_path is not None:
                done, in_progress = self._replay_checkpoint(data, False, device)
        with self._restore_state_on_error():
            if first_call:
                device = _training_device(self.device)
                data = validated_data(self, X, reset=True, device=device)
                if self.checkpoint_path is not None:
                    done, in_progress = self._replay_checkpoint(data, True, device)
            if done:
                return self  # this call's steps are in the checkpoint already
            if not self._is_fitted():
                self._initialize(data, device)
            with self._checkpoint_lock():
                completed = self._train(data, n_epochs=1, device=device, in_progress=in_progress)
            self.__dict__.pop("_checkpoint_replay", None)  # the call it stopped in is done
        if not completed and self.checkpoint_path is not None:
            # A checkpointed loop must not go on to the next block: the file would then
            # skip this one. The weights trained so far are kept; a rerun continues.
            raise KeyboardInterrupt
        return self

    def _replay_checkpoint(self, data, first_call, device):
        """Where a `partial_fit` call stands in the run of its ``checkpoint_path``.

        The first call of a new estimator reads the file: its state (as of the calls
        it holds) is loaded, and the calls it holds are replayed: each must bring the
        same data as before (checked by fingerprint) and returns at once; the call the
        run stopped in continues where its last checkpoint left it.

        Returns
        -------
        done : bool
            The checkpoint holds this call's steps: nothing to train.
        in_progress : dict or None
            The checkpoint of this call when the run stopped inside it.
        """
        if first_call:
            file = read_checkpoint(self.checkpoint_path, _checkpoint_params(self))
            if file is None:
                return False, None
            if file["calls"]:
                self._load_checkpointed_state(file, device)
            self._checkpoint_replay = _Replay(list(file["calls"]), file["in_progress"])
        replay = getattr(self, "_checkpoint_replay", None)
        if replay is None:
            if getattr(self, "n_steps_", 0) > 0 and not getattr(self, "_checkpoint_calls", []):
                raise ValueError(
                    "checkpoint_path is set on a model trained without it (by fit, by "
                    "partial_fit calls before it was set, or loaded): a checkpoint could "
                    "not tell a rerun how it was trained. Start the partial_fit loop on a "
                    "new estimator with checkpoint_path set, or save the model between "
                    "calls with skSAE.io.save."
                )
            return False, None
        call = replay.next_call
        if call < len(replay.calls):
            if replay.calls[call] != data.fingerprint:
                raise CheckpointMismatchError(
                    f"checkpoint_path={os.fspath(self.checkpoint_path)!r} holds a run whose "
                    f"partial_fit call {call + 1} had other data (another shape or other "
                    "rows). Call partial_fit with the blocks of that run, in the same "
                    "order, or delete the file (or pass another checkpoint_path) to train "
                    "from the start."
                )
            replay.next_call += 1
            if replay.next_call == len(replay.calls) and replay.in_progress is None:
                del self._checkpoint_replay
            return True, None
        return False, replay.in_progress  # the replay ends when this call completes

    @contextmanager
    def _checkpoint_lock(self):
        """Hold the lock of ``checkpoint_path`` when it is set (`checkpoint_lock`).

        The process that writes the file holds it (rank 0 of a data-parallel fit, whose
        other ranks only read the file), so a second run on the path is refused before
        it trains or writes. A ``with`` block, not a wrapper of `_train`: the warnings'
        stack levels count the frames up to the user's call.
        """
        parallel = data_parallel() if self.checkpoint_path is not None else None
        if self.checkpoint_path is None or (parallel is not None and parallel.rank != 0):
            yield
            return
        with checkpoint_lock(self.checkpoint_path):
            yield

    def _checkpointed_state(self):
        """The estimator's own state between calls (not the torch objects), to save.

        Arrays are shared, not copied: training replaces them, never mutates them.
        """
        params = self.get_params(deep=False)
        state = {
            key: value
            for key, value in self.__dict__.items()
            if key not in _NOT_SAVED and key not in params
        }
        state["loss_curve_"] = list(self.loss_curve_)
        state["_random_state"] = _random_state_tensors(self._random_state)
        return state

    def _load_checkpointed_state(self, file, device):
        """Load a `partial_fit` checkpoint's state between calls into the estimator."""
        state = from_plain(file["estimator"])
        state["_random_state"] = _random_state_from_values(state["_random_state"])
        self.__dict__.update(state)
        self._module = self._optimizer = self._compiled_loss = self._generator = None
        if file["module"] is None:
            return  # written inside a call: the call's own checkpoint has the weights
        n_components = file["module"]["W_dec_FD"].shape[0]
        module = build_module(
            self._fit_architecture, self.n_features_in_, n_components, self._fit_options
        )
        module.load_state_dict(file["module"])
        module.to(device)
        self._module = module
        self._optimizer = torch.optim.Adam(module.parameters())
        self._optimizer.load_state_dict(file["optimizer"])
        self._generator = torch.Generator("cpu")
        self._generator.set_state(file["generator"])

    def _is_fitted(self):
        return hasattr(self, "components_")

    def _n_components(self, n_features):
        """The dictionary size: `n_components`, or `expansion_factor` times the width."""
        if self.n_components is not None:
            return self.n_components
        return max(1, round(self.expansion_factor * n_features))

    def _resolve_options(self, architecture, n_components):
        """The constructor options of ``architecture``'s module, from the parameters now."""
        return ARCHITECTURES[architecture].resolve_options(self.get_params(), n_components)

    def _coefficient(self, architecture):
        """The sparsity coefficient parameter ``architecture`` trains with, or None."""
        name = ARCHITECTURES[architecture].coefficient_name
        return None if name is None else getattr(self, name)

    def _initialize(self, data, device):
        """Fresh random state, input normalisation, module and counters."""
        n_components = self._n_components(self.n_features_in_)
        options = self._resolve_options(self.architecture, n_components)
        random_state = self.random_state
        parallel = data_parallel()
        if parallel is not None and random_state is None:
            # Every rank must start from the same model and draw the same batches.
            random_state = parallel.shared_seed(int(np.random.randint(2**31 - 1)))
        self._random_state = check_random_state(random_state)
        self._generator = torch_generator(self._random_state)
        sample_BD = data.sample(_INIT_SAMPLE_ROWS, self._random_state).to(device)
        # One float64 copy of the sample, centred and scaled in place.
        centred_BD = sample_BD.to(torch.float64, copy=True)
        mean_D = centred_BD.mean(dim=0) if self.with_mean else None
        if mean_D is not None:
            centred_BD -= mean_D
        self.input_scale_ = _input_scale(centred_BD)
        self.input_mean_ = np.zeros(self.n_features_in_, np.float32)
        if mean_D is not None:
            self.input_mean_ = to_numpy(mean_D.float())
        x_BD = centred_BD.mul_(self.input_scale_).float()
        del centred_BD
        if self.decoder_bias_init == "geometric_median":
            b_dec_D = geometric_median(x_BD)
        else:
            b_dec_D = x_BD.mean(dim=0)
        module = build_module(self.architecture, self.n_features_in_, n_components, options)
        module.to(device)
        coefficient = self._coefficient(self.architecture)
        if coefficient is not None:
            module.sparsity_coefficient.fill_(coefficient)
        module.initialize(self._generator, x_BD, b_dec_D)
        if coefficient is not None:
            if self.target_l0 is not None:
                module.start_at_l0(x_BD, self.target_l0)
            self.sparsity_coefficient_ = float(module.sparsity_coefficient)
        self._module = module
        self._fit_architecture = self.architecture
        self._fit_options = options
        self._scale_from_data = False  # an imported model's weights are gone
        self._checkpoint_calls = []  # the data fingerprints of checkpointed partial_fits
        self.__dict__.pop("_checkpoint_replay", None)  # a new model replays nothing
        if hasattr(self, "latent_frequency_"):  # the previous model's
            del self.latent_frequency_
        self._optimizer = None
        self._rows_since_fired = None
        self._rows_seen = 0
        self.loss_curve_ = []
        self.n_iter_ = 0
        self.n_steps_ = 0

    def _training_module(self, device):
        """The module and optimizer for this call, rebuilt when the options changed.

        A missing module (after unpickling, or a failed call) and a change of
        architecture or of a module option since the last call rebuild it from the
        fitted NumPy state, with a fresh Adam state.
        """
        module = getattr(self, "_module", None)
        n_components = self.components_.shape[0] if module is None else module.W_dec_FD.shape[0]
        options = self._resolve_options(self.architecture, n_components)
        if (
            module is None
            or self._fit_architecture != self.architecture
            or self._fit_options != options
        ):
            if ARCHITECTURES[self.architecture].has_threshold and not hasattr(self, "threshold_"):
                raise ValueError(
                    f"partial_fit cannot continue a model fitted with architecture="
                    f"{self._fit_architecture!r} as architecture={self.architecture!r}: "
                    "it has no threshold_ to start from. Call fit to train a new model."
                )
            module = build_module(self.architecture, self.n_features_in_, n_components, options)
            mean_D = torch.from_numpy(self.input_mean_)
            state = to_training_units(self._numpy_state(), self.input_scale_, mean_D)
            try:
                module.import_state(state)
            except RuntimeError as exc:  # e.g. per-latent thresholds into a scalar one
                raise ValueError(
                    f"partial_fit cannot continue a model fitted with architecture="
                    f"{self._fit_architecture!r} as architecture={self.architecture!r}: its "
                    f"threshold_ of shape {np.shape(self.threshold_)} does not fit. Call fit "
                    "to train a new model."
                ) from exc
            self._module = module
            self._fit_architecture = self.architecture
            self._fit_options = options
            self._optimizer = None
            self._compiled_loss = None
        if next(module.parameters()).device != device:
            module.to(device)
            self._optimizer = None  # Adam's moments live on the old device
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(module.parameters())
        if getattr(self, "_generator", None) is None:
            self._generator = torch_generator(self._random_state)
        module.configure_training(aux_coefficient=self.aux_coefficient, device=device)
        return module, self._optimizer

    def _loss_function(self, module):
        """``module.loss``, compiled once per module when `compile` is set."""
        if not self.compile:
            return module.loss
        compiled = getattr(self, "_compiled_loss", None)
        if compiled is None or compiled[0] is not module:
            compiled = (module, torch.compile(module.loss))
            self._compiled_loss = compiled
        return compiled[1]

    def _train(self, data, n_epochs, device, whole_fit=False, in_progress=None):
        """Train for ``n_epochs`` passes over ``data``: `_minibatch_step` per batch, with
        a `_check` every `_CHECK_EVERY` steps and at the end of each pass.

        ``whole_fit`` (from `fit`): ``data`` is all the training data, so the learning
        rate decays at the end and a latent silent for a whole pass counts as dead.
        ``in_progress``: the checkpoint of a `partial_fit` call that stopped midway.
        """
        parallel = data_parallel()
        if parallel is not None:  # before any work: the same data on every rank
            first_HD = next(iter(data.blocks(FIRST_ROWS_COMPARED, torch.device("cpu"))))
            parallel.check_same_data(data.n_rows, first_HD)
        start = None
        if self.checkpoint_path is not None and not whole_fit:
            start = self._checkpointed_state()  # where a partial_fit call starts from
        run = self._start_run(data, n_epochs, device, whole_fit)
        checkpoints = None
        if self.checkpoint_path is not None:
            checkpoints = _Checkpoints(self, run, data, n_epochs, start, in_progress)
        resume = None if checkpoints is None else checkpoints.restore()
        completed = True
        write_error = None
        progress = tqdm(
            total=run.total_steps,
            initial=self.n_steps_ - run.steps_before,
            disable=not self.verbose,
            file=sys.stdout,
            desc=f"SparseAutoencoder({self.architecture})",
            unit="step",
        )
        try:
            for epoch in range(0 if resume is None else resume.epoch, n_epochs):
                resuming = resume is not None and epoch == resume.epoch
                if not resuming:
                    run.totals = TrainingStatistics(run.n_components, device)
                totals = run.totals
                window = run.window = TrainingStatistics(run.n_components, device)
                epoch_generator_state = self._generator.get_state()
                skip = resume.step if resuming else 0
                batches = data.batches(
                    run.batch_size,
                    self._generator,
                    device,
                    skip=skip,
                    after_skip=resume.continue_random_stream if resuming else None,
                )
                for step, x_BD in enumerate(batches, start=skip + 1):
                    self._minibatch_step(run, window, x_BD)
                    if self.n_steps_ % _CHECK_EVERY == 0 or step == run.steps_per_epoch:
                        # Before the bar's update, so its last line shows the final values.
                        progress.set_postfix(_postfix(self._check(run, window)), refresh=False)
                        totals.add(window)
                        window = run.window = TrainingStatistics(run.n_components, device)
                        if checkpoints is not None and checkpoints.due():
                            checkpoints.write(epoch, step, epoch_generator_state)
                    progress.update(1)
                if resuming:
                    resume.continue_random_stream()  # when the pass had no batch left
                run.pass_summary = totals.summary(run.module)
                self.loss_curve_.append(run.pass_summary["loss"])
                self.latent_frequency_ = to_numpy(totals.fires_F) / totals.n_rows
                self.n_iter_ += 1
                run.candidate["n_iter"] = self.n_iter_
        except KeyboardInterrupt:
            # Keep what was trained (MLPClassifier does the same); nothing trained in
            # this call: re-raise, and the caller restores the estimator.
            if self.n_steps_ == run.steps_before:
                raise
            self._keep_interrupted(run)
            completed = False  # its checkpoint stays, to continue from
        except CheckpointWriteError as error:
            # A full disk: stop, and keep the steps trained so far (the write comes
            # right after a progress check, so the run's state is whole).
            write_error = error
            completed = False
        finally:
            progress.close()
            if hasattr(self.logger, "close"):
                self.logger.close()
        self._finish(run)
        if checkpoints is not None and completed:
            try:
                checkpoints.completed()
            except CheckpointWriteError as error:
                write_error = error
        if write_error is not None:
            # As after a Ctrl-C: this call trained, so a partial_fit replay has ended.
            self.__dict__.pop("_checkpoint_replay", None)
            raise CheckpointWriteError(
                f"{write_error} The estimator keeps the model trained so far "
                f"({self.n_steps_} steps): save it elsewhere with skSAE.io.save.",
                errno=write_error.errno,
                kept_weights=True,
            ) from write_error.__cause__
        return completed

    def _start_run(self, data, n_epochs, device, whole_fit):
        """The torch state of one training call."""
        if getattr(self, "_scale_from_data", False):
            # An imported model (`skSAE.io`) trains in units measured on the first data
            # it is trained on; its weights are rebuilt in them, with a fresh Adam state.
            sample_BD = data.sample(_INIT_SAMPLE_ROWS, self._random_state).to(torch.float64)
            self.input_scale_ = _input_scale(
                sample_BD.sub_(torch.from_numpy(self.input_mean_).to(sample_BD))
            )
            self._scale_from_data = False
            self._module = None
            self._optimizer = None
        module, optimizer = self._training_module(device)
        module.train()
        n_components = module.W_dec_FD.shape[0]
        batch_size, learning_rate, total_steps = self._resolve_budget(data, n_epochs, whole_fit)
        self._resolve_warmup(module, total_steps, whole_fit)
        steps_per_epoch = math.ceil(data.n_rows / batch_size)
        # In fit, a latent silent for a whole pass over X is dead even within the window.
        tracker = DeadLatentTracker(
            n_components,
            min(self.dead_window, data.n_rows) if whole_fit else self.dead_window,
            device,
            None if self._rows_since_fired is None else torch.from_numpy(self._rows_since_fired),
            self._rows_seen,
        )
        schedule = TrainingSchedule(
            module,
            learning_rate=learning_rate,
            total_steps=total_steps,
            steps_before=self.n_steps_,
            warmup_steps=self.warmup_steps_,
            sparsity_warmup_steps=self.sparsity_warmup_steps,
            decay_fraction=self.decay_fraction if whole_fit else 0.0,
            coefficient=self._coefficient(self.architecture),
            target_l0=self.target_l0,
            # An imported model has no coefficient yet: it starts from the parameter.
            start_coefficient=getattr(
                self, "sparsity_coefficient_", self._coefficient(self.architecture)
            ),
            device=device,
        )
        use_aux = module.supports_aux_loss and self.aux_coefficient > 0
        resample = self.resample_dead and module.supports_resampling
        parallel = data_parallel()
        run = _TrainingRun(
            data=data,
            module=module,
            optimizer=optimizer,
            schedule=schedule,
            tracker=tracker,
            loss_function=self._loss_function(module),
            autocast=torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=self.mixed_precision
            ),
            n_components=n_components,
            batch_size=batch_size,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            learning_rate=learning_rate,
            steps_before=self.n_steps_,
            use_aux=use_aux,
            resample=resample,
            # The normalisation was fixed at initialisation (with_mean may have changed).
            mean_D=torch.from_numpy(self.input_mean_).to(device)
            if self.input_mean_.any()
            else None,
            scale=self.input_scale_,
            parallel=parallel,
        )
        if hasattr(module, "select_flat"):
            # BatchTopK and Matryoshka: the cut of the global batch, over the ranks (and
            # none in one process, should the module have trained under a group before).
            module.batch_cut = None
            if parallel is not None:
                module.batch_cut = lambda values_N, k: parallel.global_top_cut(
                    values_N, k * run.global_rows
                )
        # Indices of the dead latents as of the last check (a host sync, every 32 steps).
        run.dead_latents = _dead_latents(tracker) if (use_aux or resample) else None
        # Weights are good once a window of steps from them passed a check.
        run.candidate = self._good_state(run)
        return run

    def _resolve_budget(self, data, n_epochs, whole_fit):
        """`batch_size_`, `learning_rate_` and the steps of this call, from its budget.

        `fit` sizes the batch for its ``n_rows * n_epochs`` rows and the learning rate
        for its steps. `partial_fit` sees one block of an unknown stream: the batch is
        sized once, for `STREAM_TOKENS` rows, and the rate for all the steps made so
        far (at least the batch size's 1000 steps), so it falls as the stream goes on.
        """
        if self.batch_size != "auto":
            batch_size = self.batch_size
        elif whole_fit or not hasattr(self, "batch_size_"):
            batch_size = auto_batch_size(data.n_rows * n_epochs if whole_fit else STREAM_TOKENS)
        else:
            batch_size = self.batch_size_  # a later partial_fit keeps the first call's
        batch_size = min(batch_size, data.n_rows)
        total_steps = n_epochs * math.ceil(data.n_rows / batch_size)
        if self.learning_rate is not None:
            learning_rate = self.learning_rate
        elif whole_fit:
            learning_rate = default_learning_rate(total_steps, self.n_features_in_)
        else:
            learning_rate = default_learning_rate(
                max(self.n_steps_ + total_steps, stream_steps(STREAM_TOKENS)), self.n_features_in_
            )
        if whole_fit and total_steps < MIN_CONVERGED_STEPS:
            warnings.warn(
                f"This fit will make only {total_steps} optimisation steps ({n_epochs} passes "
                f"over {data.n_rows} rows, {batch_size} rows a step), too few to converge "
                f"(at least {MIN_CONVERGED_STEPS}): raise max_iter, fit on more rows, or "
                "lower batch_size.",
                ConvergenceWarning,
                stacklevel=6,  # the user's call, above fit, _fit_context, _train, _start_run
            )
        self.batch_size_ = batch_size
        self.learning_rate_ = learning_rate
        return batch_size, learning_rate, total_steps

    def _resolve_warmup(self, module, total_steps, whole_fit):
        """`warmup_steps_`: 5% of the fit's steps for ``"auto"`` (of a stream's, once).

        A fixed L1 coefficient (ReLU or gated without `target_l0`) gets none: there a
        warm-up leaves more codes on and recovers fewer directions (benchmarks/README.md,
        "Adam's betas and epsilon, the schedule, and warm-up").
        """
        if self.warmup_steps != "auto":
            self.warmup_steps_ = self.warmup_steps
        elif module.coefficient_name == "l1_coefficient" and self.target_l0 is None:
            self.warmup_steps_ = 0
        elif whole_fit:
            self.warmup_steps_ = auto_warmup_steps(total_steps)
        elif not hasattr(self, "warmup_steps_"):  # a stream: its first call decides
            self.warmup_steps_ = auto_warmup_steps(stream_steps(STREAM_TOKENS))

    def _minibatch_step(self, run, stats, x_BD):
        """One optimisation step on a batch in the user's units.

        In a data-parallel fit ``x_BD`` is the global batch: this rank trains on its
        share, and the gradients and firing counts are summed over the ranks.
        """
        module, optimizer = run.module, run.optimizer
        global_rows = run.global_rows = x_BD.shape[0]
        x_BD = _training_units(run, x_BD)
        # The whole global batch, which every rank holds: resampling draws from it, so
        # every rank resamples as one process would (and alike).
        run.last_batch_BD = x_BD
        if run.parallel is not None:
            x_BD = run.parallel.share(x_BD)
        run.schedule.apply(optimizer, self.n_steps_ - run.steps_before)
        optimizer.zero_grad(set_to_none=True)
        if x_BD.shape[0]:
            with run.autocast:
                terms = run.loss_function(x_BD, run.dead_latents if run.use_aux else None)
            terms.loss.backward()
        else:  # a global batch smaller than the ranks: this rank's share is empty
            zero = torch.zeros((), device=x_BD.device)
            terms = LossTerms(zero, zero, torch.zeros(run.n_components, device=x_BD.device))
        fires_F = terms.fires_F
        if run.parallel is not None:
            run.parallel.average_gradients(module.parameters(), x_BD.shape[0], global_rows)
            fires_F = run.parallel.all_reduce(fires_F.clone())
        module.constrain_gradients()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.max_grad_norm)
        optimizer.step()
        module.constrain_weights()
        self.n_steps_ += 1
        stats.update(x_BD, terms)  # this rank's rows; summed over the ranks at the check
        run.tracker.update(fires_F, global_rows)
        run.schedule.observe(fires_F, global_rows)

    def _check(self, run, window):
        """The periodic host sync: stop a diverging run, find dead latents, keep a snapshot.

        Returns
        -------
        summary : dict
            `TrainingStatistics.summary` of the steps since the last check.
        """
        if run.parallel is not None:
            window.reduce(run.parallel.all_reduce)
        summary = window.summary(run.module)
        if run.first_explained_variance is None:
            run.first_explained_variance = summary["explained_variance"]
        if not summary["finite"]:
            self._diverged(run, "the loss or the weights became NaN or infinite")
        if summary["error_ratio"] > _DIVERGED_ERROR_RATIO:
            self._diverged(
                run,
                f"the squared reconstruction error reached {summary['error_ratio']:.3g} times "
                f"the variance of the rows (over {_DIVERGED_ERROR_RATIO:g} means divergence)",
            )
        # On the 32-step cadence only (not at the end of a pass), as the dead set is
        # a property of the rows seen, not of where a pass ends.
        if (run.use_aux or run.resample) and self.n_steps_ % _CHECK_EVERY == 0:
            run.dead_latents = _dead_latents(run.tracker)
            if run.resample and run.dead_latents is not None:
                dead_F = run.tracker.dead_F()
                resample_dead_latents(
                    run.module, run.optimizer, dead_F, run.last_batch_BD, self._generator
                )
                run.tracker.rows_since_fired_F[dead_F] = 0
                run.dead_latents = None
        run.last_good, run.candidate = run.candidate, self._good_state(run)
        if self.logger is not None:
            self.logger.log(self._logged_metrics(run, summary), self.n_steps_)
        return summary

    def _logged_metrics(self, run, summary):
        """What `logger` receives at a check (Python floats)."""
        metrics = {
            "loss": summary["loss"],
            "l0": summary["l0"],
            "explained_variance": summary["explained_variance"],
            "dead_fraction": float(run.tracker.dead_F().float().mean()),
            "learning_rate": run.schedule.lr,
        }
        coefficient = run.schedule.coefficient()
        if coefficient is not None:
            metrics["sparsity_coefficient"] = coefficient
        return metrics

    def _good_state(self, run):
        """A copy of what a diverged run falls back to: weights, counters, dead counts."""
        return {
            "module": _snapshot(run.module),
            "n_steps": self.n_steps_,
            "n_iter": self.n_iter_,
            "rows_since_fired_F": run.tracker.rows_since_fired_F.clone(),
            "rows_seen": run.tracker.rows_seen,
        }

    def _restore_good_state(self, run):
        good = run.last_good
        run.module.load_state_dict(good["module"])
        self._optimizer = None
        self.n_steps_ = good["n_steps"]
        self.n_iter_ = good["n_iter"]
        del self.loss_curve_[good["n_iter"] :]
        run.tracker.rows_since_fired_F = good["rows_since_fired_F"]
        run.tracker.rows_seen = good["rows_seen"]

    def _diverged(self, run, reason):
        """Keep the last good weights (or none, from this call) and raise."""
        step = self.n_steps_
        kept = run.last_good is not None and run.last_good["n_steps"] > run.steps_before
        if kept:
            self._restore_good_state(run)
            self._finish(run)
            if run.module.coefficient_name is not None:  # the coefficient of those weights
                self.sparsity_coefficient_ = float(run.module.sparsity_coefficient)
            outcome = f"The weights of step {self.n_steps_} (the last good check) were kept."
        else:
            # The caller restores the estimator as it was before this call.
            outcome = "No step of this call was good: the estimator is left as it was before it."
        raise TrainingDivergedError(
            f"Training diverged at step {step}: {reason}. {outcome} Lower learning_rate "
            f"(now {run.learning_rate:.3g}) and refit, or check X for extreme values.",
            kept_weights=kept,
        )

    def _keep_interrupted(self, run):
        """After a KeyboardInterrupt: keep the steps trained so far, and warn."""
        with torch.no_grad():
            run.module.constrain_weights()  # the interrupted step may not have
            finite = all(bool(torch.isfinite(p).all()) for p in run.module.parameters())
        if not finite:
            if run.last_good is None or run.last_good["n_steps"] == run.steps_before:
                raise KeyboardInterrupt  # nothing good to keep: the caller restores
            self._restore_good_state(run)
        elif run.totals is not None:
            # An interrupted first pass: the firing frequency of the rows it saw.
            run.totals.add(run.window)
            if run.totals.n_rows and not hasattr(self, "latent_frequency_"):
                self.latent_frequency_ = to_numpy(run.totals.fires_F) / run.totals.n_rows
        warnings.warn(
            f"Training was interrupted after {self.n_steps_} steps ({self.n_iter_} full "
            "passes); the weights trained so far are kept. Call partial_fit or fit with "
            "warm_start=True to continue.",
            TrainingInterruptedWarning,
            stacklevel=5,  # the user's call, above fit, _fit_context and _train
        )

    def _finish(self, run):
        """Copy the run's weights, dead latents and coefficient to the fitted attributes."""
        if not hasattr(self, "latent_frequency_") and run.totals is not None:
            # Stopped in the first pass: the frequency over the good windows.
            if run.totals.n_rows:
                self.latent_frequency_ = to_numpy(run.totals.fires_F) / run.totals.n_rows
        final = None if run.pass_summary is None else run.pass_summary["explained_variance"]
        # Worse than the mean, and worse than where the call started: the steps did harm
        # (a fresh model starts near -1 and a short run may end just below 0: no warning).
        if final is not None and final < min(0.0, run.first_explained_variance):
            warnings.warn(
                "The trained model explains none of the variance of its training rows "
                f"(explained variance {run.first_explained_variance:.3g} in the first steps, "
                f"{final:.3g} in the last pass): it is worse than predicting their mean. "
                f"Lower learning_rate (now {run.learning_rate:.3g}) and refit, or set "
                "with_mean=True if the rows share an offset much larger than their spread.",
                ConvergenceWarning,
                stacklevel=5,
            )
        tracker = run.tracker
        self._rows_since_fired = to_numpy(tracker.rows_since_fired_F)
        self._rows_seen = tracker.rows_seen
        self.dead_fraction_ = float(tracker.dead_F().float().mean())
        coefficient = run.schedule.coefficient()
        if coefficient is not None:
            self.sparsity_coefficient_ = coefficient
        sample_rows = min(l0_sample_rows(run.n_components), _INIT_SAMPLE_ROWS)
        run.module.settle(self._training_sample(run, sample_rows))
        self._export(run.module)

    def _training_sample(self, run, n_rows):
        """Up to ``n_rows`` random rows of the call's data, in training units."""
        x_BD = run.data.sample(n_rows, self._random_state).to(run.module.W_enc_DF.device)
        return _training_units(run, x_BD)

    def _export(self, module):
        """Copy the module's public form, in the user's units, to the NumPy attributes."""
        mean_D = torch.from_numpy(self.input_mean_).to(module.W_enc_DF.device)
        state = to_user_units(module.export_state(), self.input_scale_, mean_D)
        for name, public in _PUBLIC_NAMES.items():
            if name in state:
                setattr(self, public, to_numpy(state[name]))
            elif hasattr(self, public):  # left over from another architecture
                delattr(self, public)
        if module.coefficient_name is None and hasattr(self, "sparsity_coefficient_"):
            del self.sparsity_coefficient_

    def _numpy_state(self):
        """The public form in the user's units, as CPU tensors."""
        return {
            name: torch.from_numpy(np.asarray(getattr(self, public)))
            for name, public in _PUBLIC_NAMES.items()
            if hasattr(self, public)
        }

    @contextmanager
    def _restore_state_on_error(self):
        """Leave the estimator as it was if a call fails (bad data, an early interrupt).

        A diverged run that kept some steps is the exception: it deliberately keeps its
        last good weights. Training mutates the module, the optimizer, the random state
        and the loss curve in place, so those are copied or rebuilt; weights are
        replaced, never mutated.
        """
        saved = {
            key: copy.deepcopy(value) if key in ("loss_curve_", "_random_state") else value
            for key, value in self.__dict__.items()
            if key not in _RUNTIME_STATE
        }
        generator = getattr(self, "_generator", None)
        generator_state = None if generator is None else generator.get_state()
        try:
            yield
        except BaseException as error:
            if isinstance(error, (TrainingDivergedError, CheckpointWriteError)) and (
                error.kept_weights
            ):
                raise
            self.__dict__.clear()
            self.__dict__.update(saved)
            # Rebuilt from the restored arrays at the next call, with a fresh Adam state.
            self._module = None
            self._optimizer = None
            self._compiled_loss = None
            if generator_state is not None:
                self._generator = torch.Generator("cpu")
                self._generator.set_state(generator_state)
            raise

    # ---------------------------------------------------------------- inference

    def _inference_module(self, device):
        """A frozen module holding the fitted weights in the user's units (scale folded in)."""
        module = build_module(
            self._fit_architecture,
            self.n_features_in_,
            self.components_.shape[0],
            self._fit_options,
        )
        module.import_state(self._numpy_state())
        # Frozen, so a splice run outside inference_mode builds no autograd graph.
        return module.to(device).eval().requires_grad_(False)

    def transform(self, X):
        """Latent codes of ``X``: ``act(X @ W_enc_ + b_enc_)``, row by row.

        With another `transform_algorithm`, the codes of that solver on the dictionary
        `components_` instead.

        Parameters
        ----------
        X : array-like, torch.Tensor, h5py.Dataset or numpy.memmap of shape (n_samples, n_features)
            Activations.

        Returns
        -------
        codes : ndarray or scipy.sparse.csr_matrix of shape (n_samples, n_components)
            Float32 codes; sparse when ``sparse_output=True``.
        """
        check_is_fitted(self)
        self._check_transform_params()
        blocks = []
        for _, codes_HF in self._code_blocks(X):
            blocks.append(_to_csr(codes_HF) if self.sparse_output else to_numpy(codes_HF))
        if self.sparse_output:
            return sp.vstack(blocks, format="csr", dtype=np.float32)
        return np.concatenate(blocks, axis=0)

    def _check_transform_params(self):
        """Validate the inference options, which `set_params` after fit may have changed."""
        names = ("transform_algorithm", "transform_n_nonzero_coefs", "transform_alpha")
        validate_parameter_constraints(
            {name: self._parameter_constraints[name] for name in names},
            {name: getattr(self, name) for name in names},
            caller_name=type(self).__name__,
        )
        n_components = self.components_.shape[0]
        if self.transform_algorithm == "omp" and (
            self.transform_n_nonzero_coefs is not None
            and self.transform_n_nonzero_coefs > n_components
        ):
            raise invalid_parameter(
                "transform_n_nonzero_coefs",
                type(self).__name__,
                f"an int in [1, {n_components}] (n_components) or None",
                repr(self.transform_n_nonzero_coefs),
            )

    def _code_blocks(self, X):
        """``(x_HD, codes_HF)`` for consecutive blocks of ``X``, by `transform_algorithm`.

        Tensors on the SAE's device for the encoder; for the dictionary solvers, CPU
        tensors whose codes were computed in float64 and rounded to float32.
        """
        if self.transform_algorithm == "encoder":
            device = resolve_device(self.device)
            data = validated_data(self, X, reset=False, device=device)
            yield from self._encoder_blocks(data, device)
            return
        device = torch.device("cpu")
        data = validated_data(self, X, reset=False, device=device)
        algorithm = self.transform_algorithm
        dictionary = prepare_dictionary(self.components_)
        n_nonzero_coefs, alpha = self._dictionary_settings(data, dictionary)
        b_dec_D = self.b_dec_.astype(np.float64)
        # float64 codes and the solvers' (F, H) correlations: a quarter of the bytes.
        block_rows = max(1, CHUNK_BYTES // (4 * 8 * self.components_.shape[0]))
        for x_HD in data.blocks(block_rows, device):
            codes_HF = encode_block(
                x_HD.numpy().astype(np.float64) - b_dec_D,
                dictionary,
                algorithm,
                n_nonzero_coefs=n_nonzero_coefs,
                alpha=alpha,
            )
            yield x_HD, torch.from_numpy(codes_HF.astype(np.float32))

    def _encoder_blocks(self, data, device, module=None):
        """``(x_HD, codes_HF)`` of the encoder, for consecutive blocks of ``data``."""
        module = self._inference_module(device) if module is None else module
        n_components = self.components_.shape[0]
        with torch.inference_mode():
            for x_HD in data.blocks(max(1, CHUNK_BYTES // (4 * n_components)), device):
                yield x_HD, module.encode(x_HD)

    def _dictionary_settings(self, data, dictionary):
        """``(n_nonzero_coefs, alpha)`` of the dictionary solver on ``data``, resolved."""
        algorithm = self.transform_algorithm
        if algorithm == "omp":
            n_nonzero_coefs = self.transform_n_nonzero_coefs
            if n_nonzero_coefs is None:
                n_nonzero_coefs = round(self._model_l0(data))
                n_nonzero_coefs = max(1, min(n_nonzero_coefs, self.n_features_in_))
            return n_nonzero_coefs, None
        if self.transform_alpha is not None:
            return None, float(self.transform_alpha)
        sample_SD = data.sample(_CALIBRATION_ROWS, np.random.RandomState(0))
        sample_SD = sample_SD.cpu().numpy().astype(np.float64) - self.b_dec_
        return None, calibrate_alpha(sample_SD, dictionary, algorithm, self._model_l0(data))

    def _model_l0(self, data):
        """``k`` as fitted where the architecture has one, else the encoder's mean L0."""
        if "k" in self._fit_options:
            return float(min(self._fit_options["k"], self.components_.shape[0]))
        device = resolve_device(self.device)
        nonzero, n_rows = 0, 0
        for x_HD, codes_HF in self._encoder_blocks(data, device):
            nonzero += int(torch.count_nonzero(codes_HF))
            n_rows += x_HD.shape[0]
        return nonzero / max(n_rows, 1)

    def inverse_transform(self, X):
        """Reconstruct inputs from codes: ``X @ components_ + b_dec_``.

        Parameters
        ----------
        X : array-like or scipy.sparse matrix of shape (n_samples, n_components)
            Codes, e.g. from `transform`.

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features)
            Float32 reconstructions in the units of the training data.
        """
        check_is_fitted(self)
        codes = check_array(X, accept_sparse="csr", dtype=np.float32)
        n_components = self.components_.shape[0]
        if codes.shape[1] != n_components:
            raise ValueError(
                f"codes have {codes.shape[1]} columns, but this SparseAutoencoder has "
                f"n_components={n_components}."
            )
        return np.asarray(codes @ self.components_ + self.b_dec_, dtype=np.float32)

    def score(self, X, y=None):
        """Fraction of the variance of ``X`` explained by the reconstruction.

        Equal to ``sklearn.metrics.r2_score(X, X_hat, multioutput="variance_weighted")``
        with ``X_hat = inverse_transform(transform(X))``, computed in one streamed pass.

        Parameters
        ----------
        X : array-like, torch.Tensor, h5py.Dataset or numpy.memmap of shape (n_samples, n_features)
            Activations.
        y : None
            Ignored.

        Returns
        -------
        score : float
            1.0 is a perfect reconstruction, 0.0 no better than the mean of ``X``.
            Constant columns of ``X`` follow ``r2_score``: they carry no weight, and
            rows that are all equal score 0.0 (1.0 if reconstructed exactly).
        """
        check_is_fitted(self)
        self._check_transform_params()
        accumulator = ExplainedVarianceAccumulator()
        if self.transform_algorithm != "encoder":
            for x_HD, codes_HF in self._code_blocks(X):
                x_hat_HD = codes_HF.numpy() @ self.components_ + self.b_dec_
                accumulator.update(x_HD.numpy(), x_hat_HD)
            return accumulator.result()
        device = resolve_device(self.device)
        data = validated_data(self, X, reset=False, device=device)
        module = self._inference_module(device)
        with torch.inference_mode():
            for x_HD, codes_HF in self._encoder_blocks(data, device, module):
                x_hat_HD = module.decode(codes_HF)
                accumulator.update(to_numpy(x_HD), to_numpy(x_hat_HD))
        return accumulator.result()

    # -------------------------------------------------------------------- misc

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    def __getstate__(self):
        state = {key: value for key, value in self.__dict__.items() if key not in _NOT_SAVED}
        state["_sksae_version"] = __version__
        return state

    def __setstate__(self, state):
        pop_saved_version(state, "SparseAutoencoder")
        # Pickled before the inference options existed: the encoder, as then.
        for name, default in _INFERENCE_DEFAULTS.items():
            state.setdefault(name, default)
        self.__dict__.update(state)
        if "_architecture_fitted" in state and "_fit_options" not in state:
            # Saved before the fitted options existed: they were the parameters then.
            self._fit_architecture = self.__dict__.pop("_architecture_fitted")
            self._fit_options = self._resolve_options(
                self._fit_architecture, self.components_.shape[0]
            )


@dataclass
class _TrainingRun:
    """The torch objects and running values of one training call (see `_start_run`)."""

    data: object
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: TrainingSchedule
    tracker: DeadLatentTracker
    loss_function: object
    autocast: object
    n_components: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    learning_rate: float
    steps_before: int
    use_aux: bool
    resample: bool
    mean_D: torch.Tensor | None
    scale: float
    # This rank's place in a data-parallel fit (`_distributed`), None in one process,
    # and the rows of the current global batch.
    parallel: DataParallel | None = None
    global_rows: int = 0
    # Dead latents as of the last check, and the last (global) batch, for resampling.
    dead_latents: torch.Tensor | None = None
    last_batch_BD: torch.Tensor | None = None
    # The latest snapshot (`candidate`), and the one a later window of steps passed a
    # check from (`last_good`, None until then): what a diverged run falls back to.
    candidate: dict | None = None
    last_good: dict | None = None
    # The statistics of the current pass and check window, and of the last full pass.
    totals: TrainingStatistics | None = None
    window: TrainingStatistics | None = None
    pass_summary: dict | None = None
    first_explained_variance: float | None = None


class _Resume(NamedTuple):
    """Where a restored checkpoint continues: the pass, the batches done in it."""

    epoch: int
    step: int
    continue_random_stream: object


@dataclass
class _Replay:
    """The `partial_fit` calls a checkpoint holds, replayed by a new estimator."""

    calls: list
    in_progress: dict | None
    next_call: int = 0


# Parameters that do not change the trained model, left out of checkpoint fingerprints.
_NOT_FINGERPRINTED = {
    "verbose",
    "checkpoint_path",
    "checkpoint_every",
    "device",
    "warm_start",
    "logger",
    *_INFERENCE_DEFAULTS,
}


def _checkpoint_params(sae):
    """The fingerprint of a `partial_fit` checkpoint file: the parameters."""
    return {**fingerprint_params(sae.get_params(), _NOT_FINGERPRINTED), "call": "partial_fit"}


class _Checkpoints:
    """The checkpoints of one training call (``checkpoint_path``): write, restore, end.

    A checkpoint is taken right after a progress check, when the check window is
    empty, so the state is the run's whole state: weights, Adam, the calibration, the
    dead-latent counters, the pass totals, the snapshots a divergence falls back to,
    the NumPy random state, and the torch generator both at the start of the pass
    (to redraw its order) and now (to continue after the batches already done).

    `fit` owns its file, and removes it when it completes. A run of `partial_fit`
    calls shares one file: the estimator's state between calls (``start``, as the
    current call found it) and the data fingerprints of the calls that state holds,
    with the current call's checkpoint when it is written midway (``in_progress``,
    what a new estimator continues from), or the state after the call when written
    at its end. The file stays after the last call: a rerun replays it.
    """

    def __init__(self, sae, run, data, n_epochs, start=None, in_progress=None):
        self.sae = sae
        self.run = run
        self.path = sae.checkpoint_path
        self.every = sae.checkpoint_every
        self.start = start
        self.in_progress = in_progress
        self.data_fingerprint = data.fingerprint
        self.fingerprint = {
            **self.data_fingerprint,
            **fingerprint_params(sae.get_params(), _NOT_FINGERPRINTED),
            "call": "fit" if start is None else "partial_fit",
            "n_epochs": n_epochs,
            "steps_before": run.steps_before,
            "batch_size": run.batch_size,
            "learning_rate": run.learning_rate,
        }
        if start is None or not hasattr(sae, "_checkpoint_written_at"):
            sae._checkpoint_written_at = sae.n_steps_

    def due(self):
        return self.sae.n_steps_ - self.sae._checkpoint_written_at >= self.every

    def _write(self, state):
        if self.run.parallel is None or self.run.parallel.rank == 0:  # the ranks' are equal
            write_checkpoint(self.path, state)
        self.sae._checkpoint_written_at = self.sae.n_steps_

    def _partial_fit_file(self, estimator, in_progress=None, module=None):
        """The file of a run of `partial_fit` calls (see the class docstring)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": _checkpoint_params(self.sae),
            "calls": estimator.get("_checkpoint_calls", []),
            "estimator": to_plain(estimator),
            "module": None if module is None else _on_cpu(module.state_dict()),
            "optimizer": None if module is None else _on_cpu(self.run.optimizer.state_dict()),
            "generator": None if module is None else self.sae._generator.get_state(),
            "in_progress": in_progress,
        }

    def completed(self):
        """The call completed: `fit` removes its file; `partial_fit` records the call."""
        sae = self.sae
        if self.start is None:
            parallel = self.run.parallel
            if (parallel is None or parallel.rank == 0) and os.path.exists(self.path):
                os.remove(self.path)
            return
        sae._checkpoint_calls = [*getattr(sae, "_checkpoint_calls", []), self.data_fingerprint]
        # Due, or this call wrote midway: the file then says the call is done.
        if self.due() or sae._checkpoint_written_at > self.run.steps_before:
            sae._checkpoint_written_at = sae.n_steps_  # before the state that holds it
            self._write(self._partial_fit_file(sae._checkpointed_state(), module=self.run.module))

    def write(self, epoch, step, epoch_generator_state):
        sae, run = self.sae, self.run
        calibrator = run.schedule.calibrator
        random_state = _random_state_tensors(sae._random_state)
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "step": step,
            "generator_epoch": epoch_generator_state,
            "generator_now": sae._generator.get_state(),
            "random_state": random_state,
            "estimator": {
                "n_steps_": sae.n_steps_,
                "n_iter_": sae.n_iter_,
                "loss_curve_": list(sae.loss_curve_),
                "latent_frequency_": (
                    torch.from_numpy(sae.latent_frequency_)
                    if hasattr(sae, "latent_frequency_")
                    else None
                ),
                "input_scale_": sae.input_scale_,
                "input_mean_": torch.from_numpy(sae.input_mean_),
            },
            "module": _on_cpu(run.module.state_dict()),
            "optimizer": _on_cpu(run.optimizer.state_dict()),
            "calibrator": None
            if calibrator is None
            else _on_cpu(
                {
                    "log_coefficient": calibrator.log_coefficient,
                    "l0_average": calibrator.l0_average,
                    "error": calibrator.error,
                }
            ),
            "tracker": _on_cpu(
                {
                    "rows_since_fired_F": run.tracker.rows_since_fired_F,
                    "rows_seen": run.tracker.rows_seen,
                }
            ),
            "totals": _on_cpu(vars(run.totals)),
            "run": _on_cpu(
                {
                    "first_explained_variance": run.first_explained_variance,
                    "dead_latents": run.dead_latents,
                    "candidate": run.candidate,
                    "last_good": run.last_good,
                    "pass_summary": run.pass_summary,
                }
            ),
        }
        if self.start is not None:
            state = self._partial_fit_file(self.start, in_progress=state)
        self._write(state)

    def restore(self):
        """Load the checkpoint into the run, or return None when there is none."""
        if self.start is None:
            state = read_checkpoint(self.path, self.fingerprint)
        else:
            state = self.in_progress
            if state is not None:
                check_fingerprint(state["fingerprint"], self.fingerprint, self.path)
        if state is None:
            return None
        sae, run = self.sae, self.run
        device = run.module.W_enc_DF.device
        estimator = state["estimator"]
        sae.n_steps_ = estimator["n_steps_"]
        sae.n_iter_ = estimator["n_iter_"]
        sae.loss_curve_ = list(estimator["loss_curve_"])
        if estimator["latent_frequency_"] is not None:
            sae.latent_frequency_ = estimator["latent_frequency_"].numpy()
        sae.input_scale_ = estimator["input_scale_"]
        sae.input_mean_ = estimator["input_mean_"].numpy()
        run.scale = sae.input_scale_
        run.mean_D = torch.from_numpy(sae.input_mean_).to(device) if sae.input_mean_.any() else None
        run.module.load_state_dict(state["module"])
        run.optimizer.load_state_dict(state["optimizer"])
        if state["calibrator"] is not None:
            calibrator = run.schedule.calibrator
            for name, value in state["calibrator"].items():
                setattr(calibrator, name, None if value is None else value.to(device))
        run.tracker.rows_since_fired_F = state["tracker"]["rows_since_fired_F"].to(device)
        run.tracker.rows_seen = state["tracker"]["rows_seen"]
        run.totals = TrainingStatistics(run.n_components, device)
        for name, value in state["totals"].items():
            setattr(
                run.totals, name, value.to(device) if isinstance(value, torch.Tensor) else value
            )
        saved_run = state["run"]
        run.first_explained_variance = saved_run["first_explained_variance"]
        run.dead_latents = _on_device(saved_run["dead_latents"], device)
        run.candidate = _on_device(saved_run["candidate"], device)
        run.last_good = _on_device(saved_run["last_good"], device)
        run.pass_summary = saved_run["pass_summary"]
        sae._random_state = _random_state_from_values(state["random_state"])
        sae._generator.set_state(state["generator_epoch"])
        sae._checkpoint_written_at = sae.n_steps_
        generator_now = state["generator_now"]
        continued = []

        def continue_random_stream():
            if not continued:
                sae._generator.set_state(generator_now)
                continued.append(True)

        return _Resume(state["epoch"], state["step"], continue_random_stream)


def _on_cpu(value):
    """A copy of nested dicts, lists and tuples with every tensor detached on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def _on_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _on_device(item, device) for key, item in value.items()}
    return value


def _random_state_values(random_state):
    """A NumPy RandomState's state as plain values (no pickled object): checkpoints, io."""
    _, keys, position, has_gauss, cached_gaussian = random_state.get_state()
    return {
        "random_keys": keys,
        "random_position": int(position),
        "random_has_gauss": int(has_gauss),
        "random_cached_gaussian": float(cached_gaussian),
    }


def _random_state_tensors(random_state):
    """`_random_state_values` for a checkpoint, which holds tensors: uint32 keys as int64."""
    values = _random_state_values(random_state)
    values["random_keys"] = torch.from_numpy(values["random_keys"].astype(np.int64))
    return values


def _random_state_from_values(values):
    """The RandomState `_random_state_values` describes (keys as an array or a tensor)."""
    random_state = np.random.RandomState()
    random_state.set_state(
        (
            "MT19937",
            np.asarray(values["random_keys"]).astype(np.uint32),
            int(values["random_position"]),
            int(values["random_has_gauss"]),
            float(values["random_cached_gaussian"]),
        )
    )
    return random_state


def _training_device(device):
    """`resolve_device` for training; in a data-parallel fit on CUDA, this rank's GPU."""
    resolved = resolve_device(device)
    parallel = data_parallel()
    if parallel is not None and resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", parallel.local_rank)
    return resolved


def _input_scale(centred_BD):
    """The factor that makes the mean squared norm of the rows ``n_features``.

    At that scale (Conerly et al. 2024) coefficients and learning rates mean the same
    at any activation scale.
    """
    mean_squared_norm = float(centred_BD.square().sum(dim=1).mean())
    n_features = centred_BD.shape[1]
    return math.sqrt(n_features / mean_squared_norm) if mean_squared_norm > 0 else 1.0


def _training_units(run, x_BD):
    """Rows in the user's units to the training normalisation of ``run``."""
    return (x_BD - run.mean_D) * run.scale if run.mean_D is not None else x_BD * run.scale


def _postfix(summary):
    return {
        "loss": f"{summary['loss']:.4g}",
        "L0": f"{summary['l0']:.1f}",
        "var_expl": f"{summary['explained_variance']:.3f}",
    }


def _to_csr(codes_HF):
    """A CSR matrix of a block of codes: only the non-zeros are copied to the host.

    ``nonzero`` lists the entries row by row, so its columns and values are already in
    CSR order, and the row pointers are the running counts per row.
    """
    rows_Z, columns_Z = codes_HF.nonzero(as_tuple=True)
    values_Z = codes_HF[rows_Z, columns_Z]
    counts_H = torch.bincount(rows_Z, minlength=codes_HF.shape[0])
    indptr = np.concatenate([[0], counts_H.cumsum(0).cpu().numpy()])
    return sp.csr_matrix(
        (to_numpy(values_Z), columns_Z.cpu().numpy(), indptr), shape=tuple(codes_HF.shape)
    )


def _dead_latents(tracker):
    """Indices of the tracker's dead latents, or None when there are none."""
    dead_A = tracker.dead_F().nonzero().flatten()
    return dead_A if dead_A.numel() else None


def _snapshot(module):
    """Copies of the module's state, to restore if training diverges."""
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def fitted_estimator(
    params,
    state,
    *,
    architecture=None,
    fit_options=None,
    attributes=None,
    training_state=None,
    scale_from_data=False,
):
    """A fitted `SparseAutoencoder` from a public form in the user's units (`skSAE.io`).

    Parameters
    ----------
    params : dict
        Constructor parameters.
    state : dict of ndarray
        ``W_enc_`` (D, F), ``b_enc_`` (F,), ``components_`` (F, D) with unit rows,
        ``b_dec_`` (D,), and ``threshold_`` where the architecture has one; optionally
        ``input_mean_`` (D,) and ``latent_frequency_`` (F,).
    fit_options : dict, default=None
        The module's constructor options as fitted; None resolves them from ``params``.
    architecture : str, default=None
        The fitted architecture; None means ``params["architecture"]``.
    attributes : dict, default=None
        Other fitted attributes (``input_scale_``, ``n_steps_``, ...), set as given.
    training_state : dict, default=None
        The random state and dead-latent counters of `exported_state`; None starts
        them afresh (from ``random_state``).
    scale_from_data : bool, default=False
        The training normalisation is unknown (a model trained elsewhere): the first
        training call measures it on its data.

    Returns
    -------
    sae : SparseAutoencoder
    """
    sae = SparseAutoencoder(**params)
    sae._validate_params()
    architecture = sae.architecture if architecture is None else architecture
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}."
        )
    W_enc_DF = np.array(state["W_enc_"], dtype=np.float32, order="C")
    n_features, n_components = W_enc_DF.shape
    arrays = {"W_enc_": W_enc_DF}
    for name, shape in (
        ("b_enc_", (n_components,)),
        ("components_", (n_components, n_features)),
        ("b_dec_", (n_features,)),
    ):
        arrays[name] = np.array(state[name], dtype=np.float32, order="C")
        if arrays[name].shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {arrays[name].shape}.")
    module_class = ARCHITECTURES[architecture]
    if module_class.has_threshold:
        threshold = np.array(state["threshold_"], dtype=np.float32, order="C")
        expected = () if issubclass(module_class, ARCHITECTURES["batchtopk"]) else (n_components,)
        if threshold.shape != expected:
            raise ValueError(
                f"threshold_ of architecture={architecture!r} must have shape {expected}, "
                f"got {threshold.shape}."
            )
        arrays["threshold_"] = threshold
    for name, value in arrays.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or infinite values.")
        setattr(sae, name, value)
    # No X to validate when a model is read from a file: the width is the weights'.
    sae.n_features_in_ = n_features
    sae.input_mean_ = np.zeros(n_features, np.float32)
    for name, shape, dtype in (
        ("input_mean_", (n_features,), np.float32),
        ("latent_frequency_", (n_components,), np.float64),
    ):
        if name in state:
            value = np.array(state[name], dtype=dtype, order="C")
            if value.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {value.shape}.")
            setattr(sae, name, value)
    sae.input_scale_ = 1.0
    sae.loss_curve_ = []
    sae.n_iter_ = 0
    sae.n_steps_ = 0
    for name, value in (attributes or {}).items():
        if name == "feature_names_in_":
            value = np.asarray(value, dtype=object)
        setattr(sae, name, value)
    sae._fit_architecture = architecture
    sae._fit_options = module_class.resolve_options(
        {**sae.get_params(), **(fit_options or {})}, n_components
    )
    sae._random_state = check_random_state(sae.random_state)
    if training_state is not None:
        # The state a pickle keeps, so that training continues exactly as it would.
        sae._random_state = _random_state_from_values(training_state)
    sae._generator = None
    sae._module = None
    sae._optimizer = None
    sae._rows_since_fired = None
    sae._rows_seen = 0
    if training_state is not None and "rows_since_fired" in training_state:
        sae._rows_since_fired = np.asarray(training_state["rows_since_fired"], dtype=np.float64)
        if sae._rows_since_fired.shape != (n_components,):
            raise ValueError(
                f"rows_since_fired must have shape ({n_components},), got "
                f"{sae._rows_since_fired.shape}."
            )
        sae._rows_seen = int(training_state["rows_seen"])
    sae._scale_from_data = scale_from_data
    return sae


# Fitted attributes `exported_state` saves besides the arrays, when present (`skSAE.io`).
SAVED_ATTRIBUTES = (
    "input_scale_",
    "sparsity_coefficient_",
    "dead_fraction_",
    "loss_curve_",
    "batch_size_",
    "learning_rate_",
    "warmup_steps_",
    "n_iter_",
    "n_steps_",
)
_SAVED_ARRAYS = (*_PUBLIC_NAMES.values(), "input_mean_", "latent_frequency_")


def exported_state(sae):
    """What `fitted_estimator` needs to rebuild ``sae`` exactly (`skSAE.io`'s own format).

    Returns
    -------
    saved : dict
        ``architecture`` and ``fit_options`` (as fitted), ``arrays`` (NumPy),
        ``attributes`` (JSON scalars and lists), ``training_state`` (random state and
        dead-latent counters: arrays and scalars) and ``scale_from_data``.
    """
    check_is_fitted(sae)
    arrays = {name: np.asarray(getattr(sae, name)) for name in _SAVED_ARRAYS if hasattr(sae, name)}
    attributes = {name: getattr(sae, name) for name in SAVED_ATTRIBUTES if hasattr(sae, name)}
    attributes["loss_curve_"] = [float(value) for value in attributes.get("loss_curve_", [])]
    if hasattr(sae, "feature_names_in_"):
        attributes["feature_names_in_"] = [str(name) for name in sae.feature_names_in_]
    options = dict(sae._fit_options)
    training_state = _random_state_values(sae._random_state)
    if sae._rows_since_fired is not None:
        training_state["rows_since_fired"] = np.asarray(sae._rows_since_fired, np.float64)
        training_state["rows_seen"] = int(sae._rows_seen)
    return {
        "architecture": sae._fit_architecture,
        "fit_options": {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in options.items()
        },
        "arrays": arrays,
        "attributes": attributes,
        "training_state": training_state,
        "scale_from_data": bool(getattr(sae, "_scale_from_data", False)),
    }
