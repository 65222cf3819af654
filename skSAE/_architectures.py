"""Sparse autoencoder variants as small torch modules behind one interface.

Pure torch: no scikit-learn, no NumPy state. Each variant subclasses
`SparseAutoencoderModule` and overrides `activate` (pre-activations to codes) and,
where it adds a penalty, `loss`. Everything else (weights, initialisation, decoding,
the unit-norm decoder constraint, folding the input scale) is shared.

Shape suffixes::

    N rows of X (tokens, flattened)   B minibatch rows        S sequence positions
    D n_features (d_model, SAE input) F n_components (latents) K active latents (top-k)

The model, in the units it is trained in::

    codes_BF = activate(x_BD @ W_enc_DF + b_enc_F)
    x_hat_BD = codes_BF @ W_dec_FD + b_dec_D

There is no pre-encoder bias subtraction: ``b_enc_F`` absorbs it, as in Anthropic's
April 2024 update. This keeps the public formula ``act(X @ W_enc_ + b_enc_)`` exact,
and makes the input scale fold into the biases by one multiplication.
"""

from typing import NamedTuple

import torch
from torch import nn


class LossTerms(NamedTuple):
    """What one training step needs from a forward pass."""

    loss: torch.Tensor
    """Scalar to minimise."""
    squared_error: torch.Tensor
    """Scalar: sum over the batch of squared reconstruction errors."""
    codes_BF: torch.Tensor
    """The latent codes of the batch."""


class SparseAutoencoderModule(nn.Module):
    """Shared weights and maths; subclasses choose the activation and the penalty.

    Parameters
    ----------
    n_features : int
        Input width D.
    n_components : int
        Dictionary size F.
    """

    # Tensors measured in input units: divided by the input scale when folded.
    scaled_with_input = ("b_enc_F", "b_dec_D")

    def __init__(self, n_features, n_components):
        super().__init__()
        self.W_enc_DF = nn.Parameter(torch.zeros(n_features, n_components))
        self.b_enc_F = nn.Parameter(torch.zeros(n_components))
        self.W_dec_FD = nn.Parameter(torch.zeros(n_components, n_features))
        self.b_dec_D = nn.Parameter(torch.zeros(n_features))

    @torch.no_grad()
    def initialize(self, generator, x_mean_D):
        """Random unit decoder rows, encoder = decoder transpose, decoder bias at the mean.

        The encoder starts as the decoder's transpose (Conerly et al. 2024; Gao et al.
        2024), scaled so that, with codes of about ``sqrt(D / F)`` per direction, the
        first reconstructions have the input's size rather than ``sqrt(F / D)`` times it.
        ``b_enc_F`` cancels the mean, so the first codes see centred inputs.

        Parameters
        ----------
        generator : torch.Generator
            CPU generator; all randomness comes from it.
        x_mean_D : torch.Tensor of shape (D,)
            Mean of the (normalised) training inputs.
        """
        n_features, n_components = self.W_enc_DF.shape
        W_dec_FD = torch.randn(n_components, n_features, generator=generator)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        W_enc_DF = W_dec_FD.T * (n_features / n_components) ** 0.5
        device = self.W_enc_DF.device
        self.W_dec_FD.copy_(W_dec_FD.to(device))
        self.W_enc_DF.copy_(W_enc_DF.to(device))
        self.b_dec_D.copy_(x_mean_D)
        self.b_enc_F.copy_(-(x_mean_D @ self.W_enc_DF))

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
        return torch.addmm(self.b_dec_D, codes_BF, self.W_dec_FD)

    def penalty(self, codes_BF):
        """Sparsity penalty added to the reconstruction loss (none by default)."""
        return codes_BF.new_zeros(())

    def loss(self, x_BD):
        """Mean over the batch of the squared error (summed over D) plus the penalty.

        Summing the error over D and averaging over rows is the convention of SAELens
        and Anthropic's updates, so ``l1_coefficient`` values carry over from them.
        """
        codes_BF = self.encode(x_BD)
        x_hat_BD = self.decode(codes_BF)
        squared_error = (x_hat_BD - x_BD).square().sum()
        n_rows = x_BD.shape[0]
        loss = squared_error / n_rows + self.penalty(codes_BF)
        return LossTerms(loss, squared_error.detach(), codes_BF.detach())

    @torch.no_grad()
    def remove_parallel_decoder_grad(self):
        """Drop the part of each decoder row's gradient along the row itself.

        With unit-norm rows this component only changes the norm, which the
        renormalisation after the step would undo (Bricken et al. 2023).
        """
        grad_FD = self.W_dec_FD.grad
        if grad_FD is not None:
            along_F1 = (grad_FD * self.W_dec_FD).sum(dim=1, keepdim=True)
            grad_FD.sub_(along_F1 * self.W_dec_FD)

    @torch.no_grad()
    def normalize_decoder(self):
        """Rescale every decoder row to unit norm (Bricken et al. 2023)."""
        self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def folded_state(self, scale):
        """Weights in the user's units, given inputs were multiplied by ``scale`` in training.

        Codes and every tensor in `scaled_with_input` are divided by ``scale``; the
        directions (``W_enc_DF``, ``W_dec_FD``) are unchanged. This is exact for
        positively homogeneous activations (ReLU, TopK, thresholds scaled alike).

        Returns
        -------
        state : dict of str to torch.Tensor
            Detached copies, keyed by parameter name.
        """
        return {
            name: (value / scale if name in self.scaled_with_input else value).detach().clone()
            for name, value in self.state_dict().items()
        }

    @torch.no_grad()
    def load_folded_state(self, state, scale):
        """Inverse of `folded_state`: load user-unit weights for training at ``scale``."""
        self.load_state_dict(
            {
                name: value * scale if name in self.scaled_with_input else value
                for name, value in state.items()
            }
        )


class ReLUModule(SparseAutoencoderModule):
    """ReLU codes with an L1 penalty on unit-norm decoder rows (Bricken et al. 2023).

    Parameters
    ----------
    n_features, n_components : int
        See `SparseAutoencoderModule`.
    l1_coefficient : float
        Weight of the L1 penalty on the codes.
    """

    def __init__(self, n_features, n_components, *, l1_coefficient):
        super().__init__(n_features, n_components)
        self.l1_coefficient = l1_coefficient

    def activate(self, pre_BF):
        return torch.relu(pre_BF)

    def penalty(self, codes_BF):
        # Codes are non-negative and the decoder rows have unit norm, so this is the
        # norm-weighted L1 of Conerly et al. (2024) as well as the plain one.
        return self.l1_coefficient * codes_BF.sum(dim=1).mean()


class TopKModule(SparseAutoencoderModule):
    """Keep the k largest pre-activations of each row, then ReLU (Gao et al. 2024).

    Parameters
    ----------
    n_features, n_components : int
        See `SparseAutoencoderModule`.
    k : int
        Number of latents kept per row; at most `n_components`.
    """

    def __init__(self, n_features, n_components, *, k):
        super().__init__(n_features, n_components)
        self.k = k

    def activate(self, pre_BF):
        values_BK, topk_idx_BK = pre_BF.topk(self.k, dim=1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(1, topk_idx_BK, torch.relu(values_BK))


class BatchTopKModule(SparseAutoencoderModule):
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

    scaled_with_input = ("b_enc_F", "b_dec_D", "threshold")
    # The threshold is the plain mean of the first 100 batch minima, then an
    # exponential moving average with this weight, so it tracks the codes as they grow.
    threshold_momentum = 0.01

    def __init__(self, n_features, n_components, *, k):
        super().__init__(n_features, n_components)
        self.k = k
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("n_threshold_updates", torch.zeros(()), persistent=False)

    def load_folded_state(self, state, scale):
        super().load_folded_state(state, scale)
        # A loaded threshold is settled: continue with the moving average.
        self.n_threshold_updates.fill_(1 / self.threshold_momentum)

    def activate(self, pre_BF):
        if not self.training:
            return pre_BF * (pre_BF > self.threshold)
        flat_N = torch.relu(pre_BF).flatten()
        values_K, index_K = flat_N.topk(min(self.k * pre_BF.shape[0], flat_N.numel()), sorted=False)
        with torch.no_grad():  # no host sync: an empty minimum leaves the threshold as is
            smallest = torch.where(values_K > 0, values_K, torch.inf).min()
            found = torch.isfinite(smallest)
            self.n_threshold_updates.add_(found.float())
            weight = torch.clamp(1 / self.n_threshold_updates, min=self.threshold_momentum)
            updated = torch.lerp(self.threshold, smallest, weight.clamp(max=1))
            self.threshold.copy_(torch.where(found, updated, self.threshold))
        return torch.zeros_like(flat_N).scatter_(0, index_K, values_K).view_as(pre_BF)


ARCHITECTURES = {"relu": ReLUModule, "topk": TopKModule, "batchtopk": BatchTopKModule}
"""Name of each variant (the estimator's ``architecture``) to its module class."""
