"""Sparse autoencoder variants as small torch modules behind one interface.

Pure torch: no scikit-learn, no NumPy state. Each variant subclasses
`SparseAutoencoderModule` and overrides `activate` (pre-activations to codes) and,
where it adds a penalty or auxiliary loss, `penalty` or `loss`. Everything else
(weights, initialisation, decoding, the decoder constraint, the public form of the
weights) is shared.

Shape suffixes::

    N rows of X (tokens, flattened)   B minibatch rows        S sequence positions
    D n_features (d_model, SAE input) F n_components (latents) K active latents (top-k)
    P dictionary prefixes (matryoshka) A dead latents (AuxK)

The model, in the units it is trained in::

    codes_BF = activate(x_BD @ W_enc_DF + b_enc_F)
    x_hat_BD = codes_BF @ W_dec_FD + b_dec_D

There is no pre-encoder bias subtraction: ``b_enc_F`` absorbs it, as in Anthropic's
April 2024 update. This keeps the public formula ``act(X @ W_enc_ + b_enc_)`` exact,
and makes the input normalisation fold into the biases (`to_user_units`).

Every variant exports one *public form* (`export_state`): ``W_enc_DF``, ``b_enc_F``,
``W_dec_FD`` with unit-norm rows, ``b_dec_D`` and, where codes are thresholded,
``threshold`` (a scalar for BatchTopK and Matryoshka, one per latent for JumpReLU and
Gated). Inference from that form is ``act(x @ W_enc + b_enc)`` with
``act(z) = z * (z > threshold)`` (or ReLU, or top-k), so a gated SAE, for instance,
is exported as the JumpReLU it is equivalent to (Rajamanoharan et al. 2024a).
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional


class LossTerms(NamedTuple):
    """What one training step needs from a forward pass."""

    loss: torch.Tensor
    """Scalar to minimise."""
    squared_error: torch.Tensor
    """Scalar: sum over the batch of squared reconstruction errors (detached)."""
    fires_F: torch.Tensor
    """Rows of the batch on which each latent fired (float, detached)."""


PUBLIC_KEYS = ("W_enc_DF", "b_enc_F", "W_dec_FD", "b_dec_D", "threshold")


@torch.no_grad()
def to_user_units(state, scale, mean_D):
    """The public form for raw inputs, given training saw ``(x - mean_D) * scale``.

    Codes come out divided by ``scale``; this is exact for every variant here, as
    their activations are positively homogeneous once thresholds scale alike.
    """
    user = dict(state)
    user["b_enc_F"] = state["b_enc_F"] / scale - mean_D @ state["W_enc_DF"]
    user["b_dec_D"] = state["b_dec_D"] / scale + mean_D
    if "threshold" in state:
        user["threshold"] = state["threshold"] / scale
    return user


@torch.no_grad()
def to_training_units(state, scale, mean_D):
    """Inverse of `to_user_units`."""
    trained = dict(state)
    trained["b_enc_F"] = (state["b_enc_F"] + mean_D @ state["W_enc_DF"]) * scale
    trained["b_dec_D"] = (state["b_dec_D"] - mean_D) * scale
    if "threshold" in state:
        trained["threshold"] = state["threshold"] * scale
    return trained


def threshold_for_l0(pre_NF, l0):
    """The cut ``t`` such that about ``l0`` pre-activations per row are above it.

    With ``n = round(l0 * N)``, ``t`` lies halfway between the ``n``-th and the
    ``(n + 1)``-th largest values, so exactly ``n`` are above it when they differ, and
    no row of the sample sits on the cut (where float rounding between training and
    user units would decide); at least 0.
    """
    flat = pre_NF.flatten()
    n_above = round(l0 * pre_NF.shape[0])
    if n_above >= flat.numel():
        return flat.new_zeros(())
    values = flat.topk(n_above + 1, sorted=True).values
    cut = values[-1] if n_above == 0 else (values[-2] + values[-1]) / 2
    return cut.clamp_min(0)


def l0_sample_rows(n_components):
    """Rows of the sample that places thresholds or biases at a target L0.

    About 2**22 pre-activations (16 MB in float32), at least 256 rows.
    """
    return max(256, 2**22 // n_components)


class SparseAutoencoderModule(nn.Module):
    """Shared weights and maths; subclasses choose the activation and the penalty.

    Parameters
    ----------
    n_features : int
        Input width D.
    n_components : int
        Dictionary size F.

    Attributes
    ----------
    sparsity_coefficient : torch.Tensor of shape ()
        Weight of the sparsity penalty, a buffer so that schedules and the
        ``target_l0`` calibration change it on the device.
    unit_norm_decoder : bool
        Keep decoder rows at unit norm (else the decoder is free and the penalty
        weights each latent by its decoder norm).
    """

    # What the variant needs and supports, asked by the estimator instead of its name.
    # The estimator parameters the module is built with (see `resolve_options`).
    option_names = ()
    # The estimator parameter holding the sparsity coefficient (None: no coefficient,
    # so no target_l0 calibration).
    coefficient_name = None
    # Whether training adds the AuxK loss on dead latents (`configure_training`).
    supports_aux_loss = False
    # Whether dead latents may be resampled (`skSAE._recipe.resample_dead_latents`).
    supports_resampling = False
    unit_norm_decoder = True
    # Whether the public form has a "threshold", and the tensor that holds it (if any).
    has_threshold = False
    threshold_attribute = None
    # target_l0 calibration (`SparsityCalibrator`): gain per unit of learning rate.
    # 16 x 3.2e-3 = 0.05 per step was the largest that stayed stable for ReLU and
    # gated SAEs on the synthetic set (targets 2 to 16, within 7%); twice that
    # oscillated.
    calibration_gain = 16.0
    # ... and at most this per step whatever the learning rate: Adam moves the weights
    # about the learning rate per step, so at rates above ~3e-3 L0 follows a new
    # coefficient within a few steps, but the momentum (about 10 steps) then carries it
    # on. A larger gain wound the coefficient up past the target (relu, target 4 from
    # L0 257 at lr 1e-2: coefficient x1e6, L0 0.3, never recovered).
    max_calibration_step = 0.05
    # Whether target_l0 moves the thresholds (`nudge_thresholds`) rather than the
    # sparsity coefficient.
    calibrates_thresholds = False
    # Row norm of a free decoder at initialisation. Conerly et al. (2024) use 0.05 to 1
    # with a small learning rate; at our default rates rows of norm 0.1 trained worse
    # (ground-truth cosine 0.70 against 0.90 at norm 1 on the synthetic set), as
    # Adam's step is then ten times larger relative to the row.
    free_decoder_norm = 1.0

    def __init__(self, n_features, n_components):
        super().__init__()
        self.W_enc_DF = nn.Parameter(torch.zeros(n_features, n_components))
        self.b_enc_F = nn.Parameter(torch.zeros(n_components))
        self.W_dec_FD = nn.Parameter(torch.zeros(n_components, n_features))
        self.b_dec_D = nn.Parameter(torch.zeros(n_features))
        self.register_buffer("sparsity_coefficient", torch.zeros(()))
        self._fired_BF = None

    @torch.no_grad()
    def initialize(self, generator, x_BD, b_dec_D):
        """Random decoder rows, encoder = decoder transpose, decoder bias given.

        The encoder starts as the decoder's transpose (Conerly et al. 2024; Gao et al.
        2024), scaled so that, with codes of about ``sqrt(D / F)`` per direction, the
        first reconstructions have the input's size. ``b_enc_F`` cancels ``b_dec_D``,
        so the first codes see centred inputs.

        Parameters
        ----------
        generator : torch.Generator
            CPU generator; all randomness comes from it.
        x_BD : torch.Tensor of shape (B, D)
            A sample of the (normalised) training inputs.
        b_dec_D : torch.Tensor of shape (D,)
            Initial decoder bias: the sample's mean or geometric median.
        """
        n_features, n_components = self.W_enc_DF.shape
        W_dec_FD = torch.randn(n_components, n_features, generator=generator)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        norm = 1.0 if self.unit_norm_decoder else self.free_decoder_norm
        # Codes times decoder rows are the same for any row norm.
        W_enc_DF = W_dec_FD.T * ((n_features / n_components) ** 0.5 / norm)
        device = self.W_enc_DF.device
        self.W_dec_FD.copy_(W_dec_FD.to(device) * norm)
        self.W_enc_DF.copy_(W_enc_DF.to(device))
        self.b_dec_D.copy_(b_dec_D)
        self.b_enc_F.copy_(-(b_dec_D @ self.W_enc_DF))

    @classmethod
    def resolve_options(cls, params, n_components):
        """The constructor options from the estimator's parameters (a plain dict).

        Parameters
        ----------
        params : dict
            The estimator's `get_params()`.
        n_components : int
            The dictionary size F.

        Returns
        -------
        options : dict
            Keyword arguments of the constructor, checked and resolved.
        """
        return {name: params[name] for name in cls.option_names}

    def configure_training(self, *, aux_coefficient, device):
        """Set the training-only settings of a call: AuxK weight, decode path."""

    def start_at_l0(self, x_BD, target_l0):
        """Set what the variant can so that training starts at about ``target_l0``."""

    @torch.no_grad()
    def nudge_toward_l0(self, error):
        """Act on L0 at once, given the smoothed log L0 excess ``error``.

        Called after each step of a ``target_l0`` calibration that steers the
        coefficient (ReLU, gated: the encoder or gate biases), besides the slower change
        of the coefficient: `rescue_closed_latents`.
        """
        rescue_closed_latents(self.W_enc_DF, self.b_enc_F, error)

    def settle(self, x_BD):
        """At the end of a training call, fit what inference needs to its rows ``x_BD``.

        ``x_BD`` is a sample of the call's training rows, in training units, of
        `l0_sample_rows` rows at most. Nothing by default.
        """

    def pre_activation(self, x_BD):
        """Encoder pre-activations ``x_BD @ W_enc_DF + b_enc_F``."""
        return torch.addmm(self.b_enc_F, x_BD, self.W_enc_DF)

    def activate(self, pre_BF):
        """Codes from pre-activations; each subclass defines its sparsity."""
        raise NotImplementedError

    def encode(self, x_BD):
        """Codes of a batch, shape (B, F)."""
        return self.activate(self.pre_activation(x_BD))

    def decode(self, codes_BF):
        """Reconstruction of a batch from its codes, shape (B, D)."""
        return torch.addmm(self.b_dec_D, codes_BF.to(self.W_dec_FD.dtype), self.W_dec_FD)

    def penalty(self, codes_BF, pre_BF):
        """Sparsity penalty added to the reconstruction loss (none by default)."""
        return codes_BF.new_zeros(())

    def count_fires(self, codes_BF):
        """Rows on which each latent fired, without a fresh (B, F) allocation per step.

        Codes are non-negative, so sign() marks the latents that fired. Writing into
        a reused buffer matters on the CPU: a fresh (B, F) tensor per step costs as
        much as a matrix product in page faults.
        """
        codes_BF = codes_BF.detach()
        if (
            self._fired_BF is None
            or self._fired_BF.shape != codes_BF.shape
            or (self._fired_BF.dtype != codes_BF.dtype or self._fired_BF.device != codes_BF.device)
        ):
            self._fired_BF = torch.empty_like(codes_BF)
        return torch.sign(codes_BF, out=self._fired_BF).sum(dim=0, dtype=torch.float32)

    def loss(self, x_BD, dead_latents=None):
        """Mean over the batch of the squared error (summed over D) plus the penalty.

        Summing the error over D and averaging over rows is the convention of SAELens
        and Anthropic's updates, so coefficient values carry over from them.
        ``dead_latents`` (indices, shape (A,)) is used by variants with an auxiliary
        loss on dead latents.
        """
        pre_BF = self.pre_activation(x_BD)
        codes_BF = self.activate(pre_BF)
        x_hat_BD = self.decode(codes_BF)
        squared_error = (x_hat_BD - x_BD).square().sum()
        loss = squared_error / x_BD.shape[0] + self.penalty(codes_BF, pre_BF)
        return LossTerms(loss, squared_error.detach(), self.count_fires(codes_BF))

    @torch.no_grad()
    def constrain_gradients(self):
        """Drop the part of each decoder row's gradient along the row (unit-norm decoder).

        With unit-norm rows this component only changes the norm, which the
        renormalisation after the step would undo (Bricken et al. 2023).
        """
        grad_FD = self.W_dec_FD.grad
        if self.unit_norm_decoder and grad_FD is not None:
            along_F1 = (grad_FD * self.W_dec_FD).sum(dim=1, keepdim=True)
            grad_FD.sub_(along_F1 * self.W_dec_FD)

    @torch.no_grad()
    def constrain_weights(self):
        """Rescale every decoder row to unit norm (Bricken et al. 2023), when constrained."""
        if self.unit_norm_decoder:
            self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def export_state(self):
        """The public form, in training units: detached copies keyed by `PUBLIC_KEYS`.

        A free decoder's row norms move into the encoder (and thresholds), which
        leaves codes times decoder rows, and so every reconstruction, unchanged.
        """
        state = {name: getattr(self, name).detach().clone() for name in PUBLIC_KEYS[:4]}
        state.update(self._threshold_state())
        if not self.unit_norm_decoder:
            norm_F = state["W_dec_FD"].norm(dim=1).clamp_min(1e-12)
            state["W_dec_FD"] /= norm_F[:, None]
            state["W_enc_DF"] *= norm_F
            state["b_enc_F"] *= norm_F
            if "threshold" in state:
                state["threshold"] = state["threshold"] * norm_F
        return state

    def _threshold_state(self):
        if self.threshold_attribute is None:
            return {}
        return {"threshold": getattr(self, self.threshold_attribute).detach().clone()}

    @torch.no_grad()
    def import_state(self, state):
        """Load a public form (training units), as `export_state` returns it."""
        for name in PUBLIC_KEYS[:4]:
            getattr(self, name).copy_(state[name])
        if self.threshold_attribute is not None:
            getattr(self, self.threshold_attribute).copy_(state["threshold"])


# target_l0's rescue (`rescue_closed_latents`): below this share of the target, the
# encoder biases are lifted directly, by this gain times the shortfall.
RESCUE_BELOW_TARGET = 0.5
RESCUE_GAIN = 0.05


@torch.no_grad()
def rescue_closed_latents(W_enc_DF, b_enc_F, error):
    """Lift every encoder bias when the calibrated L0 is far below its target.

    ``error`` is the smoothed ``log((L0 + 1) / (target + 1))``. Below
    `RESCUE_BELOW_TARGET` times the target, each bias rises by `RESCUE_GAIN` times the
    shortfall (in log units) times the latent's pre-activation scale (its encoder
    column norm: the normalised inputs have unit variance along any direction). A
    coefficient far above its equilibrium closes every latent of a ReLU or gated SAE
    within a few steps, faster than the calibration lowers it, and a closed latent
    gets no gradient: on 30,000 rows of the tests' synthetic set, target 4, starting
    at 100 left L0 at 0 for good without it, and at 4.0-4.1 with it. Lifting the
    biases at every step instead (above the target too) cost recovery.
    """
    shortfall = torch.clamp(math.log(RESCUE_BELOW_TARGET) - error, min=0.0)
    b_enc_F.add_(RESCUE_GAIN * shortfall * W_enc_DF.norm(dim=0))


class ReLUModule(SparseAutoencoderModule):
    """ReLU codes with an L1 penalty (Bricken et al. 2023; Conerly et al. 2024).

    Parameters
    ----------
    n_features, n_components : int
        See `SparseAutoencoderModule`.
    decoder_constraint : {"unit_norm", "free"}
        ``"unit_norm"``: decoder rows renormalised after each step, plain L1.
        ``"free"``: an unconstrained decoder, and the L1 of each code weighted by its
        decoder row's norm, so shrinking codes by growing rows does not pay.
    """

    option_names = ("decoder_constraint",)
    coefficient_name = "l1_coefficient"
    supports_resampling = True

    def __init__(self, n_features, n_components, *, decoder_constraint="unit_norm"):
        super().__init__(n_features, n_components)
        self.decoder_constraint = decoder_constraint

    @property
    def unit_norm_decoder(self):
        return self.decoder_constraint == "unit_norm"

    @torch.no_grad()
    def start_at_l0(self, x_BD, target_l0):
        """Lower every encoder bias by one amount so that training starts at ``target_l0``.

        A fresh ReLU SAE fires about half its latents; reaching a small target from
        there took the calibration far past it (see `max_calibration_step`).
        """
        pre_BF = self.pre_activation(x_BD[: l0_sample_rows(self.b_enc_F.numel())])
        self.b_enc_F.sub_(threshold_for_l0(pre_BF, target_l0))

    def activate(self, pre_BF):
        return torch.relu(pre_BF)

    def penalty(self, codes_BF, pre_BF):
        if self.unit_norm_decoder:
            return self.sparsity_coefficient * codes_BF.sum(dim=1).mean()
        return self.sparsity_coefficient * (codes_BF @ self.W_dec_FD.norm(dim=1)).mean()


def _sparse_decode(values_BK, index_BK, W_dec_FD, offsets_B=None):
    """``codes @ W_dec_FD`` from the active codes only: a gather of K rows per row.

    ``embedding_bag`` sums the selected decoder rows weighted by their codes, and its
    backward pass touches only those rows (Gao et al. 2024 use a kernel like it).
    With ``offsets_B``, the inputs are flat and ``offsets_B`` marks where each row's
    codes start.
    """
    return functional.embedding_bag(
        index_BK,
        W_dec_FD,
        offsets_B,
        mode="sum",
        per_sample_weights=values_BK.to(W_dec_FD.dtype),
    )


class TopKModule(SparseAutoencoderModule):
    """Keep the k largest pre-activations of each row, then ReLU (Gao et al. 2024).

    Training adds the AuxK loss of Gao et al.: the ``aux_k`` largest pre-activations
    of the dead latents reconstruct the remaining error, weighted by
    ``aux_coefficient``, which gives dead latents a gradient back to life.

    Parameters
    ----------
    n_features, n_components : int
        See `SparseAutoencoderModule`.
    k : int
        Number of latents kept per row; at most `n_components`.

    Attributes
    ----------
    aux_coefficient : float
        Weight of the AuxK loss (0 switches it off).
    aux_k : int
        Dead latents used per row by AuxK: ``n_features // 2`` (Gao et al. 2024).
    sparse_decode : bool
        Decode in training by gathering the active decoder rows (`_sparse_decode`)
        instead of a dense product with the (B, F) codes.
    """

    option_names = ("k",)
    supports_aux_loss = True

    def __init__(self, n_features, n_components, *, k):
        super().__init__(n_features, n_components)
        self.k = k
        self.aux_coefficient = 0.0
        self.aux_k = max(1, min(n_features // 2, n_components))
        self.sparse_decode = False

    @classmethod
    def resolve_options(cls, params, n_components):
        # The k largest of fewer than k values are all of them.
        return {"k": min(params["k"], n_components)}

    def configure_training(self, *, aux_coefficient, device):
        self.aux_coefficient = aux_coefficient
        self.sparse_decode = use_sparse_decode(self, device)

    def select(self, pre_BF):
        """The active codes of each row: values (ReLU applied) and latent indices (B, K)."""
        values_BK, index_BK = pre_BF.topk(self.k, dim=1, sorted=False)
        return torch.relu(values_BK), index_BK

    def activate(self, pre_BF):
        values_BK, index_BK = self.select(pre_BF)
        return torch.zeros_like(pre_BF).scatter_(1, index_BK, values_BK)

    def _reconstruct(self, pre_BF):
        """Reconstruction and per-latent fire counts of a batch, dense or sparse."""
        values_BK, index_BK = self.select(pre_BF)
        if self.sparse_decode:
            x_hat_BD = _sparse_decode(values_BK, index_BK, self.W_dec_FD) + self.b_dec_D
        else:
            codes_BF = torch.zeros_like(pre_BF).scatter_(1, index_BK, values_BK)
            x_hat_BD = self.decode(codes_BF)
        return x_hat_BD, _fires_from_indices(values_BK, index_BK, pre_BF.shape[1])

    def loss(self, x_BD, dead_latents=None):
        pre_BF = self.pre_activation(x_BD)
        x_hat_BD, fires_F = self._reconstruct(pre_BF)
        # x_hat - x, not x - x_hat: the same squares, and no negation in the backward pass.
        residual_BD = x_hat_BD - x_BD
        squared_error = residual_BD.square().sum()
        loss = squared_error / x_BD.shape[0]
        if dead_latents is not None and self.aux_coefficient > 0:
            aux = self.aux_loss(pre_BF, residual_BD.detach(), dead_latents)
            loss = loss + self.aux_coefficient * aux
        return LossTerms(loss, squared_error.detach(), fires_F)

    def aux_loss(self, pre_BF, residual_BD, dead_latents):
        """AuxK: squared error of the dead latents' top-``aux_k`` fit to the error.

        The error is ``x - x_hat = -residual_BD``. Only the dead latents' columns are
        searched, so the cost follows their number rather than the dictionary's size.
        """
        pre_BA = pre_BF.index_select(1, dead_latents)
        values_BK, index_BK = pre_BA.topk(min(self.aux_k, pre_BA.shape[1]), dim=1, sorted=False)
        aux_BD = _sparse_decode(torch.relu(values_BK), dead_latents[index_BK], self.W_dec_FD)
        return (aux_BD + residual_BD).square().sum() / pre_BF.shape[0]


def _fires_from_indices(values_BK, index_BK, n_components):
    """Rows on which each latent fired, counted from the selected indices (no (B, F) pass)."""
    fires_F = torch.zeros(n_components, device=values_BK.device)
    return fires_F.index_add_(0, index_BK.flatten(), (values_BK.detach() > 0).flatten().float())


class BatchTopKModule(TopKModule):
    """Keep the ``k * B`` largest codes of a training batch; a threshold at inference.

    In training the sparsity budget is shared over the batch, so rows may use more or
    fewer than k latents (Bussmann et al. 2024). The smallest code kept in each batch
    feeds a running mean, ``threshold``; in eval mode a pre-activation is kept when it
    exceeds it, so a row's codes never depend on the other rows of its batch.

    Parameters
    ----------
    n_features, n_components : int
        See `SparseAutoencoderModule`.
    k : int
        Average number of latents kept per row.
    """

    has_threshold = True
    threshold_attribute = "threshold"
    # The threshold is the plain mean of the first 100 batch minima, then an
    # exponential moving average with this weight, so it tracks the codes as they grow.
    threshold_momentum = 0.01

    def __init__(self, n_features, n_components, *, k):
        super().__init__(n_features, n_components, k=k)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("n_threshold_updates", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def import_state(self, state):
        super().import_state(state)
        # A loaded threshold is settled: continue with the moving average.
        self.n_threshold_updates.fill_(1 / self.threshold_momentum)

    batch_cut = None
    """In a data-parallel fit, ``batch_cut(flat_N, k)`` gives the global batch's cut and
    the smallest positive code it keeps over all ranks (`DataParallel.global_top_cut`)."""

    def select_flat(self, pre_BF):
        """The batch's ``k * B`` largest codes: values and flat indices ``row * F + latent``.

        The indices come sorted, so each row's codes are contiguous; the threshold
        is updated from the smallest positive value kept.
        """
        flat_N = torch.relu(pre_BF).flatten()
        if self.batch_cut is not None:
            # A data-parallel fit: keep what clears the cut of the *global* batch, so
            # the ranks together keep the global batch's k * B largest codes, and feed
            # the threshold the global batch's smallest kept code, not this rank's.
            cut, smallest = self.batch_cut(flat_N, self.k)
            index_K = (flat_N >= cut).nonzero().flatten()
            values_K = flat_N[index_K]
        else:
            n_kept = min(self.k * pre_BF.shape[0], flat_N.numel())
            values_K, index_K = flat_N.topk(n_kept, sorted=False)
            index_K, order_K = index_K.sort()
            values_K = values_K[order_K]
            kept_K = values_K.detach()
            smallest = torch.where(kept_K > 0, kept_K, torch.inf).min()
        self._update_threshold(smallest)
        return values_K, index_K

    @torch.no_grad()
    def _update_threshold(self, smallest):
        """Fold the smallest positive code kept in a batch (inf: none) into `threshold`."""
        # No host sync: an empty minimum leaves the threshold as is.
        found = torch.isfinite(smallest)
        self.n_threshold_updates.add_(found.float())
        weight = torch.clamp(1 / self.n_threshold_updates, min=self.threshold_momentum)
        updated = torch.lerp(self.threshold, smallest, weight.clamp(max=1))
        self.threshold.copy_(torch.where(found, updated, self.threshold))

    @torch.no_grad()
    def settle(self, x_BD):
        """Set `threshold` so that inference keeps ``k`` codes per row of ``x_BD`` on average.

        The running mean of the batch minima lags the weights by about 100 batches
        (`threshold_momentum`): after a short run it kept twice ``k``.
        """
        self.threshold.copy_(threshold_for_l0(torch.relu(self.pre_activation(x_BD)), self.k))

    def activate(self, pre_BF):
        if not self.training:
            return torch.where(pre_BF > self.threshold, pre_BF, 0.0)
        values_K, index_K = self.select_flat(pre_BF)
        return torch.zeros_like(pre_BF).flatten().scatter_(0, index_K, values_K).view_as(pre_BF)

    def _reconstruct(self, pre_BF):
        n_rows, n_components = pre_BF.shape
        values_K, index_K = self.select_flat(pre_BF)
        latent_K = index_K % n_components
        if self.sparse_decode:
            rows_K = torch.div(index_K, n_components, rounding_mode="floor")
            counts_B = torch.bincount(rows_K, minlength=n_rows)
            offsets_B = counts_B.cumsum(0) - counts_B
            x_hat_BD = _sparse_decode(values_K, latent_K, self.W_dec_FD, offsets_B) + self.b_dec_D
        else:
            codes_N = torch.zeros_like(pre_BF).flatten().scatter_(0, index_K, values_K)
            x_hat_BD = self.decode(codes_N.view_as(pre_BF))
        return x_hat_BD, _fires_from_indices(values_K, latent_K, n_components)


class MatryoshkaModule(BatchTopKModule):
    """BatchTopK whose dictionary prefixes each learn to reconstruct (Bussmann et al. 2025).

    The loss is the mean, over the prefixes ``W_dec_FD[:m]`` for ``m`` in
    ``prefix_sizes``, of the squared error of the reconstruction from the codes of
    that prefix alone. Early latents thus carry general directions, and later ones
    refine them rather than absorb them. Inference is BatchTopK's.

    Parameters
    ----------
    n_features, n_components : int
        See `SparseAutoencoderModule`.
    k : int
        Average number of latents kept per row.
    prefix_sizes : tuple of int
        Increasing prefix lengths, the last equal to ``n_components``.
    """

    option_names = ("k", "prefix_sizes")

    def __init__(self, n_features, n_components, *, k, prefix_sizes):
        super().__init__(n_features, n_components, k=k)
        self.prefix_sizes = tuple(prefix_sizes)

    @classmethod
    def resolve_options(cls, params, n_components):
        options = super().resolve_options(params, n_components)
        options["prefix_sizes"] = resolve_prefix_sizes(params["prefix_sizes"], n_components)
        return options

    def loss(self, x_BD, dead_latents=None):
        pre_BF = self.pre_activation(x_BD)
        n_rows, n_components = pre_BF.shape
        values_K, index_K = self.select_flat(pre_BF)
        codes_BF = torch.zeros_like(pre_BF).flatten().scatter_(0, index_K, values_K)
        codes_BF = codes_BF.view_as(pre_BF)
        x_hat_BD = self.b_dec_D.expand_as(x_BD)
        prefix_errors_P = []
        start = 0
        for stop in self.prefix_sizes:
            x_hat_BD = x_hat_BD + codes_BF[:, start:stop] @ self.W_dec_FD[start:stop]
            prefix_errors_P.append((x_hat_BD - x_BD).square().sum())
            start = stop
        squared_error = prefix_errors_P[-1]
        loss = torch.stack(prefix_errors_P).mean() / n_rows
        if dead_latents is not None and self.aux_coefficient > 0:
            residual_BD = (x_hat_BD - x_BD).detach()
            loss = loss + self.aux_coefficient * self.aux_loss(pre_BF, residual_BD, dead_latents)
        fires_F = _fires_from_indices(values_K, index_K % n_components, n_components)
        return LossTerms(loss, squared_error.detach(), fires_F)


def _rectangle(pre_BF, threshold_F, bandwidth, out=None):
    """The kernel window of the straight-through estimators, ``|z - t| < bandwidth / 2`` (bool).

    ``out``, a float tensor like ``pre_BF``, receives the distance ``|z - t|`` on the way.
    """
    distance_BF = pre_BF - threshold_F if out is None else torch.sub(pre_BF, threshold_F, out=out)
    return distance_BF.abs_() < bandwidth / 2


class _JumpReLU(torch.autograd.Function):
    """``z * (z > t)`` and each row's L0 ``sum(z > t)``, with pseudo-gradients for ``t``.

    Through the codes, d/dt is ``-(t / bandwidth) * K((z - t) / bandwidth)`` with a
    rectangle kernel K, and z gets the plain gradient of the mask; through the L0, d/dt
    is ``-(1 / bandwidth) * K((z - t) / bandwidth)`` and z gets none (Rajamanoharan et
    al. 2024b). Also returns each latent's firing count (no gradient).

    One function for both, so that the backward pass keeps two boolean (B, F) masks
    rather than the float pre-activations (the codes are kept by the decoder's product
    anyway), and the counts come from one float pass over the mask.
    """

    @staticmethod
    def forward(ctx, pre_BF, threshold_F, bandwidth):
        fired_BF = pre_BF > threshold_F
        # One float (B, F) buffer beside the pre-activations: the step, then the
        # distance to the threshold, then the codes.
        buffer_BF = torch.empty_like(pre_BF)
        step_BF = buffer_BF.copy_(fired_BF)
        l0_B = step_BF.sum(dim=1)
        fires_F = step_BF.sum(dim=0, dtype=torch.float32)
        # Under autocast (bfloat16 pre-activations) the distance is float32: no reuse.
        reuse = pre_BF.dtype == threshold_F.dtype
        window_BF = _rectangle(pre_BF, threshold_F, bandwidth, out=buffer_BF if reuse else None)
        ctx.save_for_backward(fired_BF, window_BF, threshold_F)
        ctx.bandwidth = bandwidth
        ctx.mark_non_differentiable(fires_F)
        # Outputs without a gradient (the counts; the L0 outside the loss) get None.
        ctx.set_materialize_grads(False)
        codes_BF = torch.where(fired_BF, pre_BF, pre_BF.new_zeros(()), out=buffer_BF)
        return codes_BF, l0_B, fires_F

    @staticmethod
    def backward(ctx, grad_BF, grad_l0_B, grad_fires_F):
        fired_BF, window_BF, threshold_F = ctx.saved_tensors
        # One (B, F) buffer beside grad_BF for the products, which becomes d/dz.
        dtype = (grad_BF if grad_BF is not None else grad_l0_B).dtype
        buffer_BF = torch.empty_like(window_BF, dtype=dtype)
        grad_threshold_F = None
        if grad_BF is not None:
            product_BF = torch.mul(grad_BF, window_BF, out=buffer_BF)
            grad_threshold_F = -(threshold_F / ctx.bandwidth) * product_BF.sum(dim=0)
        if grad_l0_B is not None:
            product_BF = torch.mul(grad_l0_B[:, None], window_BF, out=buffer_BF)
            grad_l0_F = -product_BF.sum(dim=0) / ctx.bandwidth
            grad_threshold_F = (
                grad_l0_F if grad_threshold_F is None else grad_threshold_F + grad_l0_F
            )
        if grad_threshold_F is not None:
            grad_threshold_F = grad_threshold_F.to(threshold_F.dtype)
        grad_pre_BF = None if grad_BF is None else torch.mul(grad_BF, fired_BF, out=buffer_BF)
        return grad_pre_BF, grad_threshold_F, None


class JumpReLUModule(SparseAutoencoderModule):
    """Per-latent learned thresholds and an L0 penalty (Rajamanoharan et al. 2024b).

    ``codes = z * (z > threshold_F)``. The thresholds are trained directly (not as
    logarithms: Adam moves a parameter by about the learning rate per step, so a
    log-threshold near 0.01 would crawl) through straight-through estimators with a
    rectangle kernel of width ``bandwidth``.

    Under these estimators each threshold settles near ``sqrt(c) / 2`` for an L0
    coefficient c (measured: 0.48 to 0.51 times ``sqrt(c)`` for c from 0.1 to 3 on
    the synthetic benchmark). Thresholds start there, so the coefficient moves L0
    from the first step instead of after the thresholds have crawled to it.

    Parameters
    ----------
    n_features, n_components : int
        See `SparseAutoencoderModule`.
    bandwidth : float
        Kernel width of the straight-through estimators, in training units.
    """

    # JumpReLU's L0 follows its coefficient only as fast as Adam moves the thresholds
    # (about the learning rate per step), so calibrating the coefficient lagged and
    # ran away (coefficients of 1e-11 to 1e8, L0 off by -34% to +264%). target_l0
    # therefore scales the thresholds directly, by exp(gain * error) per step, and the
    # coefficient follows as their equilibrium, 4 * mean(threshold)**2.
    calibrates_thresholds = True
    threshold_calibration_gain = 0.1
    has_threshold = True
    threshold_attribute = "threshold_F"
    option_names = ("bandwidth",)
    coefficient_name = "l0_coefficient"

    def __init__(self, n_features, n_components, *, bandwidth):
        super().__init__(n_features, n_components)
        self.bandwidth = bandwidth
        self.threshold_F = nn.Parameter(torch.zeros(n_components))

    @torch.no_grad()
    def initialize(self, generator, x_BD, b_dec_D):
        super().initialize(generator, x_BD, b_dec_D)
        self.threshold_F.fill_(float(self.sparsity_coefficient.sqrt()) / 2)

    @torch.no_grad()
    def start_at_l0(self, x_BD, target_l0):
        """One threshold for all latents, the pre-activation quantile giving ``target_l0``.

        The coefficient then starts where that threshold is the equilibrium.
        """
        pre_BF = self.pre_activation(x_BD[: l0_sample_rows(self.b_enc_F.numel())])
        threshold = float(threshold_for_l0(pre_BF, target_l0).clamp_min(1e-6))
        self.threshold_F.fill_(threshold)
        self.sparsity_coefficient.fill_(4 * threshold**2)

    @torch.no_grad()
    def nudge_thresholds(self, error):
        """Scale every threshold by ``exp(gain * error)``, ``error`` the log L0 excess."""
        self.threshold_F.mul_(torch.exp(self.threshold_calibration_gain * error))
        self.sparsity_coefficient.copy_(4 * self.threshold_F.mean().square())

    def activate(self, pre_BF):
        if not self.training:
            return torch.where(pre_BF > self.threshold_F, pre_BF, 0.0)
        return _JumpReLU.apply(pre_BF, self.threshold_F, self.bandwidth)[0]

    def penalty(self, codes_BF, pre_BF):
        l0_B = _JumpReLU.apply(pre_BF, self.threshold_F, self.bandwidth)[1]
        return self.sparsity_coefficient * l0_B.mean()

    def loss(self, x_BD, dead_latents=None):
        # The pre-activations are not kept: the backward pass needs only the masks.
        codes_BF, l0_B, fires_F = _JumpReLU.apply(
            self.pre_activation(x_BD), self.threshold_F, self.bandwidth
        )
        squared_error = (self.decode(codes_BF) - x_BD).square().sum()
        loss = squared_error / x_BD.shape[0] + self.sparsity_coefficient * l0_B.mean()
        return LossTerms(loss, squared_error.detach(), fires_F)

    @torch.no_grad()
    def constrain_weights(self):
        super().constrain_weights()
        # A negative threshold would let negative codes through.
        self.threshold_F.clamp_(min=0)


class GatedModule(SparseAutoencoderModule):
    """Separate gate and magnitude paths with shared directions (Rajamanoharan et al. 2024a).

    ``gate = x @ W_enc_DF + b_enc_F`` decides which latents fire,
    ``magnitude = (x @ W_enc_DF) * exp(r_mag_F) + b_mag_F`` sets their values, and
    ``codes = (gate > 0) * relu(magnitude)``. The L1 penalty acts on ``relu(gate)``,
    and an auxiliary loss makes ``relu(gate)`` reconstruct the input through a frozen
    copy of the decoder, so the gate gets a gradient although the step has none.

    The public form is the equivalent JumpReLU: ``W_enc * exp(r_mag)``, ``b_mag`` and
    ``threshold = relu(b_mag - exp(r_mag) * b_enc)``.

    Parameters
    ----------
    n_features, n_components : int
        See `SparseAutoencoderModule`.
    """

    has_threshold = True
    coefficient_name = "l1_coefficient"

    def __init__(self, n_features, n_components):
        super().__init__(n_features, n_components)
        self.r_mag_F = nn.Parameter(torch.zeros(n_components))
        self.b_mag_F = nn.Parameter(torch.zeros(n_components))

    @torch.no_grad()
    def initialize(self, generator, x_BD, b_dec_D):
        super().initialize(generator, x_BD, b_dec_D)
        self.r_mag_F.zero_()
        self.b_mag_F.copy_(self.b_enc_F)

    @torch.no_grad()
    def start_at_l0(self, x_BD, target_l0):
        """Lower every gate bias by one amount so that training starts at ``target_l0``."""
        gate_BF, _ = self._paths(x_BD[: l0_sample_rows(self.b_enc_F.numel())])
        self.b_enc_F.sub_(threshold_for_l0(gate_BF, target_l0))

    def _paths(self, x_BD):
        base_BF = x_BD @ self.W_enc_DF
        return base_BF + self.b_enc_F, torch.addcmul(self.b_mag_F, base_BF, self.r_mag_F.exp())

    def encode(self, x_BD):
        gate_BF, magnitude_BF = self._paths(x_BD)
        return (gate_BF > 0) * torch.relu(magnitude_BF)

    def loss(self, x_BD, dead_latents=None):
        n_rows = x_BD.shape[0]
        gate_BF, magnitude_BF = self._paths(x_BD)
        codes_BF = (gate_BF > 0) * torch.relu(magnitude_BF)
        squared_error = (self.decode(codes_BF) - x_BD).square().sum()
        gate_codes_BF = torch.relu(gate_BF)
        sparsity = self.sparsity_coefficient * gate_codes_BF.sum(dim=1).mean()
        frozen_BD = torch.addmm(self.b_dec_D.detach(), gate_codes_BF, self.W_dec_FD.detach())
        auxiliary = (frozen_BD - x_BD).square().sum() / n_rows
        loss = squared_error / n_rows + sparsity + auxiliary
        return LossTerms(loss, squared_error.detach(), self.count_fires(codes_BF))

    @torch.no_grad()
    def export_state(self):
        scale_F = self.r_mag_F.exp()
        return {
            "W_enc_DF": self.W_enc_DF * scale_F,
            "b_enc_F": self.b_mag_F.clone(),
            "W_dec_FD": self.W_dec_FD.clone(),
            "b_dec_D": self.b_dec_D.clone(),
            "threshold": torch.relu(self.b_mag_F - scale_F * self.b_enc_F),
        }

    @torch.no_grad()
    def import_state(self, state):
        """Load a JumpReLU public form as the gated SAE with ``r_mag = 0`` computing it."""
        self.W_enc_DF.copy_(state["W_enc_DF"])
        self.W_dec_FD.copy_(state["W_dec_FD"])
        self.b_dec_D.copy_(state["b_dec_D"])
        self.r_mag_F.zero_()
        self.b_mag_F.copy_(state["b_enc_F"])
        self.b_enc_F.copy_(state["b_enc_F"] - state["threshold"])


ARCHITECTURES = {
    "relu": ReLUModule,
    "topk": TopKModule,
    "batchtopk": BatchTopKModule,
    "jumprelu": JumpReLUModule,
    "gated": GatedModule,
    "matryoshka": MatryoshkaModule,
}
"""Name of each variant (the estimator's ``architecture``) to its module class."""


def build_module(architecture, n_features, n_components, options):
    """The module of ``architecture`` with its resolved constructor ``options``.

    Parameters
    ----------
    architecture : str
        A key of `ARCHITECTURES`.
    n_features, n_components : int
        Input width D and dictionary size F.
    options : dict
        From ``ARCHITECTURES[architecture].resolve_options(params, n_components)``.

    Returns
    -------
    module : SparseAutoencoderModule
    """
    return ARCHITECTURES[architecture](n_features, n_components, **options)


def resolve_prefix_sizes(prefix_sizes, n_components):
    """Matryoshka's prefix lengths: increasing, ending at ``n_components`` (a tuple).

    ``None`` gives ``n_components // 2**j`` for ``j = 4, ..., 0``; given sizes must be
    strictly increasing positive integers no larger than ``n_components``, which is
    appended when missing.
    """
    if prefix_sizes is None:
        sizes = [n_components // 2**j for j in range(4, -1, -1)]
        return tuple(sorted({size for size in sizes if size > 0}))
    sizes = np.asarray(prefix_sizes)
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
            f"n_components={n_components}, got {prefix_sizes!r}."
        )
    sizes = [int(size) for size in sizes]
    return tuple(sizes if sizes[-1] == n_components else [*sizes, n_components])


def use_sparse_decode(module, device):
    """Whether training should decode `TopKModule` codes sparsely (`_sparse_decode`).

    On the CPU the gather is faster once the dictionary is at least 64 times wider
    than k (``benchmarks/bench_sparse_decode.py``, widths 64 to 576: 1.03 to 1.61
    times at 64, 1.11 to 2.01 at 128 and more; 0.76 to 1.07 at 16). Other devices
    decode densely: the crossover there has not been measured. Matryoshka decodes
    prefix by prefix and stays dense.
    """
    if isinstance(module, MatryoshkaModule) or device.type != "cpu":
        return False
    return module.W_dec_FD.shape[0] >= SPARSE_DECODE_MIN_RATIO * module.k


# Dictionary width over k from which the sparse decode is faster on the CPU.
SPARSE_DECODE_MIN_RATIO = 64
