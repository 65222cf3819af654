"""`SparseAutoencoder`: the scikit-learn estimator around the torch modules.

This module is sklearn glue: parameters, validation, the fit/partial_fit loops, the
NumPy <-> torch hand-over and pickling. The maths lives in `_architectures`.

Shape suffixes: N rows of X, B minibatch rows, H rows of a chunk, D n_features,
F n_components.
"""

import copy
import math
import sys
import warnings
from contextlib import contextmanager
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from . import __version__
from ._architectures import (
    ARCHITECTURES,
    COEFFICIENT_ARCHITECTURES,
    TOPK_ARCHITECTURES,
    TopKModule,
    to_training_units,
    to_user_units,
    use_sparse_decode,
)
from ._array_metrics import ExplainedVarianceAccumulator
from ._recipe import (
    DeadLatentTracker,
    SparsityCalibrator,
    decay_factor,
    default_learning_rate,
    geometric_median,
    resample_dead_latents,
    warmup_factor,
)
from ._sklearn_compat import Interval, StrOptions, _fit_context
from ._utils import (
    is_streamed,
    is_torch_tensor,
    read_only_tensor,
    resolve_device,
    to_numpy,
    torch_generator,
)
from .cache import iter_chunks

# Steps between the loop's only host/device synchronisations: a finiteness check of
# the loss and weights (to stop a diverging run) and the progress-bar refresh.
_CHECK_EVERY = 32
# Rows used to estimate the input scale and mean at initialisation.
_INIT_SAMPLE_ROWS = 65_536
# Bytes of one chunk read from disk, and of one block of codes at inference.
_CHUNK_BYTES = 64 * 2**20


# Module state names and the fitted attributes that hold them (in the user's units).
_PUBLIC_NAMES = {
    "W_enc_DF": "W_enc_",
    "b_enc_F": "b_enc_",
    "W_dec_FD": "components_",
    "b_dec_D": "b_dec_",
    "threshold": "threshold_",
}
# Private torch objects: rebuilt from the NumPy state, never pickled or restored.
_RUNTIME_STATE = ("_module", "_optimizer", "_generator", "_compiled_loss")


def inference_module(sae, device):
    """A frozen torch module of a fitted SAE, in the user's units, on ``device``.

    For package code that runs the SAE inside a model's forward pass (splices,
    steering, top activations): ``module.encode(x_ND)`` and ``module.decode(codes_NF)``
    equal `SparseAutoencoder.transform` and `SparseAutoencoder.inverse_transform`.
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
    """Training produced a non-finite loss or weights; the last finite weights are kept."""


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
        more than about ``sqrt(l0_coefficient)``, where the thresholds start. Only used
        when ``architecture="jumprelu"``.
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
        starts them at norm 0.1 and weights each code's L1 by its decoder norm
        (Conerly et al. 2024). Either way `components_` has unit rows: the norms are
        folded into the encoder. Only used when ``architecture="relu"``.
    with_mean : bool, default=False
        Subtract the training mean before scaling (see Notes). The mean is folded into
        the biases, so results stay in the units of ``X``.
    decoder_bias_init : {"mean", "geometric_median"}, default="mean"
        Starting point of `b_dec_`, computed on up to 65,536 training rows.
    learning_rate : float, default=None
        Adam step size. ``None`` means ``2e-4 / sqrt(n_components / 2**14)`` (Gao et al.
        2024): 2e-4 at 16,384 latents, 3.2e-3 at 64.
    warmup_steps : int, default=0
        Steps of linear learning-rate warm-up at the start of training.
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
    batch_size : int, default=4096
        Rows per optimisation step (``min(batch_size, n_samples)``).
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

    Attributes
    ----------
    W_enc_ : ndarray of shape (n_features_in_, n_components)
        Encoder weights.
    b_enc_ : ndarray of shape (n_components,)
        Encoder bias.
    components_ : ndarray of shape (n_components, n_features_in_)
        Decoder directions, one unit-norm row per latent.
    b_dec_ : ndarray of shape (n_features_in_,)
        Decoder bias: the reconstruction of an all-zero code.
    threshold_ : ndarray of shape () or (n_components,)
        Codes are kept where the pre-activation exceeds it: one value for
        ``"batchtopk"`` and ``"matryoshka"`` (a running mean of the smallest code kept
        in each training batch), one per latent for ``"jumprelu"`` and ``"gated"``.
        Absent for the other architectures.
    input_scale_ : float
        Factor the inputs were multiplied by in training so that their mean squared norm
        (after centring, with `with_mean`) equals ``n_features_in_``.
    input_mean_ : ndarray of shape (n_features_in_,)
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
    n_iter_ : int
        Passes over the data made so far.
    n_steps_ : int
        Optimisation steps made so far.
    n_features_in_ : int
        Number of features seen during `fit`.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during `fit`, when ``X`` has string column names.

    See Also
    --------
    sklearn.decomposition.MiniBatchDictionaryLearning : Sparse coding with a fixed solver.

    Notes
    -----
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
        "warmup_steps": [Interval(Integral, 0, None, closed="left")],
        "decay_fraction": [Interval(Real, 0, 1, closed="both")],
        "sparsity_warmup_steps": [Interval(Integral, 0, None, closed="left")],
        "max_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "dead_window": [Interval(Integral, 1, None, closed="left")],
        "aux_coefficient": [Interval(Real, 0, None, closed="left")],
        "resample_dead": ["boolean"],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "mixed_precision": ["boolean"],
        "compile": ["boolean"],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "sparse_output": ["boolean"],
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
        warmup_steps=0,
        decay_fraction=0.2,
        sparsity_warmup_steps=0,
        max_grad_norm=None,
        dead_window=1_000_000,
        aux_coefficient=1 / 32,
        resample_dead=False,
        batch_size=4096,
        max_iter=10,
        mixed_precision=False,
        compile=False,
        device="auto",
        random_state=None,
        verbose=0,
        warm_start=False,
        sparse_output=False,
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
            A `ValueError` raised when the loss or the weights become NaN/inf; the
            weights of the last finite check are kept.
        """
        continuing = self.warm_start and self._is_fitted()
        with self._restore_state_on_error():
            device = resolve_device(self.device)
            data = self._validated(X, reset=not continuing, device=device)
            if not continuing or self._architecture_fitted != self.architecture:
                self._initialize(data, device)
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
        """
        first_call = not self._is_fitted()
        with self._restore_state_on_error():
            device = resolve_device(self.device)
            data = self._validated(X, reset=first_call, device=device)
            if first_call:
                self._initialize(data, device)
            self._train(data, n_epochs=1, device=device)
        return self

    def _is_fitted(self):
        return hasattr(self, "components_")

    def _n_components(self, n_features):
        """The dictionary size: `n_components`, or `expansion_factor` times the width."""
        if self.n_components is not None:
            return self.n_components
        return max(1, round(self.expansion_factor * n_features))

    def _module_options(self, architecture, n_components):
        """The estimator parameters that ``architecture``'s module is built with."""
        if architecture in TOPK_ARCHITECTURES:
            # The k largest of fewer than k values are all of them.
            options = {"k": min(self.k, n_components)}
            if architecture == "matryoshka":
                options["prefix_sizes"] = self._prefix_sizes(n_components)
            return options
        if architecture == "relu":
            return {"decoder_constraint": self.decoder_constraint}
        if architecture == "jumprelu":
            return {"bandwidth": self.bandwidth}
        return {}

    def _prefix_sizes(self, n_components):
        """Validated `prefix_sizes`, ending at ``n_components``."""
        if self.prefix_sizes is None:
            sizes = [n_components // 2**j for j in range(4, -1, -1)]
            return tuple(sorted({size for size in sizes if size > 0}))
        sizes = np.asarray(self.prefix_sizes)
        if (
            sizes.ndim != 1
            or sizes.size == 0
            or not np.issubdtype(sizes.dtype, np.integer)
            or sizes[0] < 1
            or np.any(np.diff(sizes) <= 0)
            or sizes[-1] > n_components
        ):
            raise ValueError(
                "prefix_sizes must be strictly increasing positive integers no larger than "
                f"n_components={n_components}, got {self.prefix_sizes!r}."
            )
        sizes = [int(size) for size in sizes]
        return tuple(sizes if sizes[-1] == n_components else [*sizes, n_components])

    def _base_coefficient(self):
        """The sparsity coefficient parameter of the architecture being trained."""
        return self.l0_coefficient if self.architecture == "jumprelu" else self.l1_coefficient

    def _initialize(self, data, device):
        """Fresh random state, input normalisation, module and optimizer."""
        n_components = self._n_components(self.n_features_in_)
        self._random_state = check_random_state(self.random_state)
        self._generator = torch_generator(self._random_state)
        sample_BD = data.sample(_INIT_SAMPLE_ROWS, self._random_state).to(device)
        mean_D = sample_BD.double().mean(dim=0) if self.with_mean else None
        centred_BD = sample_BD.double() if mean_D is None else sample_BD.double() - mean_D
        mean_squared_norm = float(centred_BD.square().sum(dim=1).mean())
        # Mean squared norm = n_features after scaling (Conerly et al. 2024), so that
        # coefficients and learning rates mean the same at any activation scale.
        self.input_scale_ = (
            math.sqrt(self.n_features_in_ / mean_squared_norm) if (mean_squared_norm > 0) else 1.0
        )
        self.input_mean_ = np.zeros(self.n_features_in_, np.float32)
        if mean_D is not None:
            self.input_mean_ = to_numpy(mean_D.float())
        x_BD = (centred_BD * self.input_scale_).float()
        if self.decoder_bias_init == "geometric_median":
            b_dec_D = geometric_median(x_BD)
        else:
            b_dec_D = x_BD.mean(dim=0)
        module = ARCHITECTURES[self.architecture](
            self.n_features_in_,
            n_components,
            **self._module_options(self.architecture, n_components),
        )
        module.to(device)
        module.sparsity_coefficient.fill_(self._base_coefficient())
        module.initialize(self._generator, x_BD, b_dec_D)
        if self.target_l0 is not None and self.architecture in COEFFICIENT_ARCHITECTURES:
            module.start_at_l0(x_BD, self.target_l0)
        if self.architecture in COEFFICIENT_ARCHITECTURES:
            self.sparsity_coefficient_ = float(module.sparsity_coefficient)
        self._module = module
        self._optimizer = None
        self._rows_since_fired = None
        self._rows_seen = 0
        self.loss_curve_ = []
        self.n_iter_ = 0
        self.n_steps_ = 0

    def _training_module(self, device):
        """The module and optimizer, rebuilt from the NumPy state after unpickling."""
        module = getattr(self, "_module", None)
        n_components = self.components_.shape[0] if module is None else module.W_dec_FD.shape[0]
        options = self._module_options(self.architecture, n_components)
        if (
            module is None
            or type(module) is not ARCHITECTURES[self.architecture]
            or getattr(module, "prefix_sizes", None) != options.get("prefix_sizes")
        ):
            module = ARCHITECTURES[self.architecture](self.n_features_in_, n_components, **options)
            if module.has_threshold and not hasattr(self, "threshold_"):
                raise ValueError(
                    f"partial_fit cannot continue a model fitted with architecture="
                    f"{self._architecture_fitted!r} as architecture={self.architecture!r}: "
                    "it has no threshold_ to start from. Call fit to train a new model."
                )
            mean_D = torch.from_numpy(self.input_mean_)
            module.import_state(to_training_units(self._numpy_state(), self.input_scale_, mean_D))
            self._module = module
            self._optimizer = None
            self._compiled_loss = None
        for name, value in options.items():
            setattr(module, name, value)
        if next(module.parameters()).device != device:
            module.to(device)
            self._optimizer = None  # Adam's moments live on the old device
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(module.parameters(), lr=self._learning_rate())
        if getattr(self, "_generator", None) is None:
            self._generator = torch_generator(self._random_state)
        if isinstance(module, TopKModule):
            module.aux_coefficient = self.aux_coefficient
            module.sparse_decode = use_sparse_decode(module, device)
        return module, self._optimizer

    def _learning_rate(self):
        if self.learning_rate is not None:
            return self.learning_rate
        n_components = self.components_.shape[0] if self._is_fitted() else None
        if n_components is None:
            n_components = self._module.W_dec_FD.shape[0]
        return default_learning_rate(n_components)

    def _loss_function(self, module):
        """``module.loss``, compiled once per module when `compile` is set."""
        if not self.compile:
            return module.loss
        compiled = getattr(self, "_compiled_loss", None)
        if compiled is None or compiled[0] is not module:
            compiled = (module, torch.compile(module.loss))
            self._compiled_loss = compiled
        return compiled[1]

    def _train(self, data, n_epochs, device, whole_fit=False):
        """Train for ``n_epochs`` passes over ``data``.

        ``whole_fit`` (from `fit`): ``data`` is all the training data, so the learning
        rate decays at the end and a latent silent for a whole pass counts as dead.
        """
        module, optimizer = self._training_module(device)
        module.train()
        scale = self.input_scale_
        # The normalisation was fixed at initialisation (with_mean may have changed since).
        mean_D = torch.from_numpy(self.input_mean_).to(device) if self.input_mean_.any() else None
        batch_size = min(self.batch_size, data.n_rows)
        steps_per_epoch = math.ceil(data.n_rows / batch_size)
        total_steps = n_epochs * steps_per_epoch
        n_components = module.W_dec_FD.shape[0]
        # In fit, a latent silent for a whole pass over X is dead even within the window.
        tracker = DeadLatentTracker(
            n_components,
            min(self.dead_window, data.n_rows) if whole_fit else self.dead_window,
            device,
            None if self._rows_since_fired is None else torch.from_numpy(self._rows_since_fired),
            self._rows_seen,
        )
        schedule = _Schedule(self, module, total_steps, whole_fit, device)
        use_aux = isinstance(module, TopKModule) and self.aux_coefficient > 0
        resample = self.resample_dead and self.architecture == "relu"
        # Indices of the dead latents as of the last check (a host sync, every 32 steps).
        dead_latents = _dead_latents(tracker) if (use_aux or resample) else None
        loss_function = self._loss_function(module)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.mixed_precision)
        progress = tqdm(
            total=total_steps,
            disable=not self.verbose,
            file=sys.stdout,
            desc=f"SparseAutoencoder({self.architecture})",
            unit="step",
        )
        last_good = _snapshot(module)
        last_good_step = self.n_steps_
        try:
            for epoch in range(n_epochs):
                stats = _EpochStats(n_components, device)
                for x_BD in data.batches(batch_size, self._generator, self._random_state, device):
                    x_BD = (x_BD - mean_D) * scale if mean_D is not None else x_BD * scale
                    schedule.apply(optimizer, epoch * steps_per_epoch + stats.n_steps)
                    with autocast:
                        terms = loss_function(x_BD, dead_latents if use_aux else None)
                    optimizer.zero_grad(set_to_none=True)
                    terms.loss.backward()
                    module.constrain_gradients()
                    if self.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(module.parameters(), self.max_grad_norm)
                    optimizer.step()
                    module.constrain_weights()
                    stats.update(x_BD, terms)
                    tracker.update(terms.fires_F, x_BD.shape[0])
                    schedule.observe(terms.fires_F, x_BD.shape[0])
                    self.n_steps_ += 1
                    progress.update(1)
                    if self.n_steps_ % _CHECK_EVERY == 0:
                        summary = stats.summary(module)
                        if not summary["finite"]:
                            self._diverged(module, last_good, last_good_step)
                        if use_aux or resample:
                            dead_latents = _dead_latents(tracker)
                            if resample and dead_latents is not None:
                                dead_F = tracker.dead_F()
                                resample_dead_latents(
                                    module, optimizer, dead_F, x_BD, self._generator
                                )
                                tracker.rows_since_fired_F[dead_F] = 0
                                dead_latents = None
                        last_good = _snapshot(module)
                        last_good_step = self.n_steps_
                        progress.set_postfix(_postfix(summary), refresh=False)
                summary = stats.summary(module)
                if not summary["finite"]:
                    self._diverged(module, last_good, last_good_step)
                last_good = _snapshot(module)
                last_good_step = self.n_steps_
                progress.set_postfix(_postfix(summary), refresh=False)
                self.loss_curve_.append(summary["loss"])
                self.latent_frequency_ = to_numpy(stats.fires_F) / stats.n_rows
                self.n_iter_ += 1
        finally:
            progress.close()
        self._rows_since_fired = to_numpy(tracker.rows_since_fired_F)
        self._rows_seen = tracker.rows_seen
        self.dead_fraction_ = float(tracker.dead_F().float().mean())
        if self.architecture in COEFFICIENT_ARCHITECTURES:
            self.sparsity_coefficient_ = schedule.coefficient()
        self._export(module)

    def _diverged(self, module, last_good, last_good_step):
        module.load_state_dict(last_good)
        self._optimizer = None
        self._export(module)
        raise TrainingDivergedError(
            f"Training diverged at step {self.n_steps_}: the loss or the weights became "
            f"NaN or infinite. The weights of step {last_good_step} (the last finite check) "
            f"were kept. Lower learning_rate (now {self._learning_rate():.3g}) and refit, or "
            "check X for extreme values."
        )

    def _export(self, module):
        """Copy the module's public form, in the user's units, to the NumPy attributes."""
        mean_D = torch.from_numpy(self.input_mean_).to(module.W_enc_DF.device)
        state = to_user_units(module.export_state(), self.input_scale_, mean_D)
        for name, public in _PUBLIC_NAMES.items():
            if name in state:
                setattr(self, public, to_numpy(state[name]))
            elif hasattr(self, public):  # left over from another architecture
                delattr(self, public)
        if self.architecture not in COEFFICIENT_ARCHITECTURES and hasattr(
            self, "sparsity_coefficient_"
        ):
            del self.sparsity_coefficient_
        self._architecture_fitted = self.architecture

    def _numpy_state(self):
        """The public form in the user's units, as CPU tensors."""
        return {
            name: torch.from_numpy(np.asarray(getattr(self, public)))
            for name, public in _PUBLIC_NAMES.items()
            if hasattr(self, public)
        }

    @contextmanager
    def _restore_state_on_error(self):
        """Leave the estimator as it was if a call fails (bad data, interrupt).

        A diverged run is the exception: it deliberately keeps its last finite weights.
        Training mutates the module, the optimizer, the random state and the loss curve
        in place, so those are copied or rebuilt; weights are replaced, never mutated.
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
        except TrainingDivergedError:
            raise
        except BaseException:
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
        n_components = self.components_.shape[0]
        module = ARCHITECTURES[self._architecture_fitted](
            self.n_features_in_,
            n_components,
            **self._module_options(self._architecture_fitted, n_components),
        )
        module.import_state(self._numpy_state())
        # Frozen, so a splice run outside inference_mode builds no autograd graph.
        return module.to(device).eval().requires_grad_(False)

    def transform(self, X):
        """Latent codes of ``X``: ``act(X @ W_enc_ + b_enc_)``, row by row.

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
        device = resolve_device(self.device)
        data = self._validated(X, reset=False, device=device)
        module = self._inference_module(device)
        n_components = self.components_.shape[0]
        blocks = []
        with torch.inference_mode():
            for x_HD in data.blocks(max(1, _CHUNK_BYTES // (4 * n_components)), device):
                codes_HF = module.encode(x_HD)
                blocks.append(_to_csr(codes_HF) if self.sparse_output else to_numpy(codes_HF))
        if self.sparse_output:
            return sp.vstack(blocks, format="csr", dtype=np.float32)
        return np.concatenate(blocks, axis=0)

    def inverse_transform(self, X):
        """Reconstruct inputs from codes: ``X @ components_ + b_dec_``.

        Parameters
        ----------
        X : array-like or scipy.sparse matrix of shape (n_samples, n_components)
            Codes, e.g. from `transform`.

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features_in_)
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
        """
        check_is_fitted(self)
        device = resolve_device(self.device)
        data = self._validated(X, reset=False, device=device)
        module = self._inference_module(device)
        accumulator = ExplainedVarianceAccumulator(shift=self.b_dec_)
        n_components = self.components_.shape[0]
        with torch.inference_mode():
            for x_HD in data.blocks(max(1, _CHUNK_BYTES // (4 * n_components)), device):
                x_hat_HD = module.decode(module.encode(x_HD))
                accumulator.update(to_numpy(x_HD), to_numpy(x_hat_HD))
        return accumulator.result()

    # ------------------------------------------------------------- data & misc

    def _validated(self, X, *, reset, device):
        """Check ``X`` and wrap it as an `_InMemoryData` or a `_StreamedData`."""
        if is_streamed(X):
            return _StreamedData(self, X, reset=reset)
        if is_torch_tensor(X):
            X = X.detach()
            if X.device.type != "cpu":
                return _InMemoryData(_validated_device_tensor(self, X, reset=reset), device)
            X = X.to(torch.float32).numpy() if X.dtype.is_floating_point else X.numpy()
        X = validate_data(self, X, reset=reset, dtype=np.float32)
        return _InMemoryData(read_only_tensor(X), device)

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    def __getstate__(self):
        state = {key: value for key, value in self.__dict__.items() if key not in _RUNTIME_STATE}
        state["_sksae_version"] = __version__
        return state

    def __setstate__(self, state):
        version = state.pop("_sksae_version", None)
        if version != __version__:
            warnings.warn(
                f"This SparseAutoencoder was saved with skSAE {version} and is loaded with "
                f"skSAE {__version__}; check its outputs.",
                UserWarning,
                stacklevel=2,
            )
        self.__dict__.update(state)


def _postfix(summary):
    return {
        "loss": f"{summary['loss']:.4g}",
        "L0": f"{summary['l0']:.1f}",
        "var_expl": f"{summary['explained_variance']:.3f}",
    }


def _to_csr(codes_HF):
    """A CSR matrix of a block of codes, built from its non-zeros only."""
    codes = to_numpy(codes_HF)
    return sp.csr_matrix(codes)


class _Schedule:
    """The learning rate and the sparsity coefficient of each step of one call.

    Learning-rate warm-up (over the estimator's steps so far) and final decay (over
    this call, when ``decay``); sparsity warm-up; and the ``target_l0`` calibration,
    whose gain follows the learning rate. Sets them on the optimizer and the module
    without host synchronisation.
    """

    def __init__(self, estimator, module, total_steps, decay, device):
        self.estimator = estimator
        self.module = module
        self.total_steps = total_steps
        self.decay = decay
        self.base_lr = estimator._learning_rate()
        self.lr = self.base_lr
        self.uses_coefficient = estimator.architecture in COEFFICIENT_ARCHITECTURES
        self.base_coefficient = estimator._base_coefficient()
        self.calibrator = None
        if self.uses_coefficient and estimator.target_l0 is not None:
            self.calibrator = SparsityCalibrator(
                estimator.sparsity_coefficient_, estimator.target_l0, device
            )
        # A calibrated coefficient is set each step by `apply`, or, for thresholds
        # calibrated directly, kept at their equilibrium by the module.
        if self.uses_coefficient and self.calibrator is None:
            module.sparsity_coefficient.fill_(self.base_coefficient)

    def apply(self, optimizer, step):
        """Set the rate and coefficient of this call's 0-based ``step``."""
        estimator = self.estimator
        done = estimator.n_steps_
        factor = warmup_factor(done, estimator.warmup_steps)
        if self.decay:
            factor *= decay_factor(step, self.total_steps, estimator.decay_fraction)
        self.lr = self.base_lr * factor
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        warm = warmup_factor(done, estimator.sparsity_warmup_steps)
        if self.calibrator is not None and not self.module.calibrates_thresholds:
            self.module.sparsity_coefficient.copy_(self.calibrator.coefficient * warm)
        elif self.uses_coefficient and done <= estimator.sparsity_warmup_steps:
            self.module.sparsity_coefficient.fill_(self.base_coefficient * warm)

    def observe(self, fires_F, n_rows):
        """Let the calibration see the L0 of the batch just trained on."""
        if self.calibrator is None:
            return
        if self.module.calibrates_thresholds:
            self.module.nudge_thresholds(self.calibrator.measure(fires_F, n_rows))
        else:
            self.calibrator.update(fires_F, n_rows, self.module.calibration_gain * self.lr)

    def coefficient(self):
        """The coefficient reached: calibrated, or the parameter (a Python float)."""
        if self.calibrator is None:
            return float(self.base_coefficient)
        if self.module.calibrates_thresholds:
            return float(self.module.sparsity_coefficient)
        return float(self.calibrator.coefficient)


def _dead_latents(tracker):
    """Indices of the tracker's dead latents, or None when there are none."""
    dead_A = tracker.dead_F().nonzero().flatten()
    return dead_A if dead_A.numel() else None


def _snapshot(module):
    """Copies of the module's state, to restore if training diverges."""
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


class _EpochStats:
    """Device-side running sums of one pass; read (one sync) only at checks."""

    def __init__(self, n_components, device):
        self.fires_F = torch.zeros(n_components, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.squared_error = torch.zeros((), dtype=torch.float64, device=device)
        self.x_sum_D = None
        self.x_squares = torch.zeros((), dtype=torch.float64, device=device)
        self.n_rows = 0
        self.n_steps = 0

    def update(self, x_BD, terms):
        self.fires_F += terms.fires_F
        self.loss_sum += terms.loss.detach() * x_BD.shape[0]
        self.squared_error += terms.squared_error
        x_sum_D = x_BD.sum(dim=0, dtype=torch.float64)
        self.x_sum_D = x_sum_D if self.x_sum_D is None else self.x_sum_D + x_sum_D
        self.x_squares += x_BD.square().sum(dtype=torch.float64)
        self.n_rows += x_BD.shape[0]
        self.n_steps += 1

    def summary(self, module):
        """Python floats of the pass so far, with a finiteness flag (one sync)."""
        finite = torch.isfinite(self.loss_sum)
        for parameter in module.parameters():
            finite = finite & torch.isfinite(parameter).all()
        total = self.x_squares - self.x_sum_D.square().sum() / self.n_rows
        values = torch.stack(
            [
                finite.double(),
                self.loss_sum / self.n_rows,
                self.fires_F.sum().double() / self.n_rows,
                1 - self.squared_error / total.clamp_min(1e-30),
            ]
        ).tolist()
        return {
            "finite": bool(values[0]),
            "loss": values[1],
            "l0": values[2],
            "explained_variance": values[3],
        }


class _InMemoryData:
    """A validated float32 tensor, batched by a random permutation of all rows.

    Parameters
    ----------
    X_ND : torch.Tensor of shape (N, D)
        Validated data, on the CPU or on ``device``.
    device : torch.device
        Where batches are computed. CPU data is moved there whole when it fits in a
        quarter of the free accelerator memory, else batch by batch.
    """

    def __init__(self, X_ND, device):
        if X_ND.device != device and device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(device)
            if X_ND.element_size() * X_ND.nelement() < free_bytes // 4:
                X_ND = X_ND.to(device)
        self.X_ND = X_ND
        self.n_rows = X_ND.shape[0]

    def sample(self, n_rows, random_state):
        """Up to ``n_rows`` distinct random rows (all rows when there are fewer)."""
        if self.n_rows <= n_rows:
            return self.X_ND
        rows = np.sort(random_state.choice(self.n_rows, n_rows, replace=False))
        return self.X_ND[torch.from_numpy(rows).to(self.X_ND.device)]

    def batches(self, batch_size, generator, random_state, device):
        """One shuffled pass, as batches of ``batch_size`` rows (the last may be short)."""
        order_N = torch.randperm(self.n_rows, generator=generator).to(self.X_ND.device)
        for start in range(0, self.n_rows, batch_size):
            x_BD = self.X_ND.index_select(0, order_N[start : start + batch_size])
            yield x_BD.to(device, non_blocking=True)

    def blocks(self, block_rows, device):
        """The rows in order, in blocks of ``block_rows``."""
        for start in range(0, self.n_rows, block_rows):
            yield self.X_ND[start : start + block_rows].to(device, non_blocking=True)


class _StreamedData:
    """An `h5py.Dataset` or `numpy.memmap`, read and validated one chunk at a time."""

    def __init__(self, estimator, X, *, reset):
        if len(X.shape) != 2:
            raise ValueError(
                f"Expected a 2D array, got a {len(X.shape)}D {type(X).__name__} of shape "
                f"{X.shape}; reshape it to (n_samples, n_features)."
            )
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise ValueError(f"X has dtype {X.dtype}; expected a numeric (float or integer) array.")
        # Validates the shape (empty X, feature count) on a two-row slice only.
        validate_data(estimator, np.asarray(X[:2]), reset=reset, dtype=np.float32)
        self.X = X
        self.n_rows = X.shape[0]
        self.n_features = X.shape[1]
        self.chunk_rows = max(1, _CHUNK_BYTES // (4 * self.n_features))

    def _checked(self, start, block):
        try:
            block = check_array(block, dtype=np.float32, ensure_all_finite=True)
        except ValueError as exc:
            stop = start + block.shape[0]
            raise ValueError(f"{exc} (rows {start}:{stop} of the {type(self.X).__name__})") from exc
        return read_only_tensor(block)

    def sample(self, n_rows, random_state):
        """A contiguous block of up to ``n_rows`` rows at a random offset."""
        start = int(random_state.randint(max(1, self.n_rows - n_rows + 1)))
        return self._checked(start, np.asarray(self.X[start : start + n_rows]))

    def batches(self, batch_size, generator, random_state, device):
        """One pass: chunks in random order, rows shuffled within; full batches across chunks."""
        leftover_BD = None
        for start, block in iter_chunks(
            self.X, self.chunk_rows, shuffle=True, random_state=random_state
        ):
            x_HD = self._checked(start, block)
            x_HD = x_HD[torch.randperm(x_HD.shape[0], generator=generator)]
            if leftover_BD is not None:
                x_HD = torch.cat([leftover_BD, x_HD])
            n_full = x_HD.shape[0] // batch_size * batch_size
            for offset in range(0, n_full, batch_size):
                yield x_HD[offset : offset + batch_size].to(device, non_blocking=True)
            leftover_BD = x_HD[n_full:] if n_full < x_HD.shape[0] else None
        if leftover_BD is not None:
            yield leftover_BD.to(device, non_blocking=True)

    def blocks(self, block_rows, device):
        """The rows in order, in blocks of at most ``block_rows``."""
        for start, block in iter_chunks(self.X, min(block_rows, self.chunk_rows)):
            yield self._checked(start, block).to(device)


def _validated_device_tensor(estimator, X, *, reset):
    """Validate a tensor on an accelerator without copying it to the host."""
    if X.ndim != 2:
        raise ValueError(
            f"Expected a 2D tensor, got {X.ndim}D of shape {tuple(X.shape)}; reshape it to "
            "(n_samples, n_features)."
        )
    if X.dtype.is_complex or X.dtype == torch.bool:
        raise ValueError(f"X has dtype {X.dtype}; expected a real floating or integer tensor.")
    validate_data(estimator, X[:2].float().cpu().numpy(), reset=reset, dtype=np.float32)
    X = X.to(torch.float32)
    if not bool(torch.isfinite(X).all()):
        raise ValueError("Input X contains NaN or infinity.")
    return X
