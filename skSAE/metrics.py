"""Quality metrics of a sparse autoencoder.

Every metric is a plain function on arrays that returns a Python float. Metrics over
data too large for memory accumulate sufficient statistics chunk by chunk and finish
once; they never average per-chunk ratios.
"""

import warnings
from typing import NamedTuple

import numpy as np
import torch
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.utils import check_array


def mean_l0(codes):
    """Average number of active latents per row.

    Parameters
    ----------
    codes : array-like of shape (n_samples, n_components)
        Output of `SparseAutoencoder.transform` (dense or scipy sparse).

    Returns
    -------
    l0 : float
        Mean count of non-zero entries per row.

    Examples
    --------
    >>> mean_l0([[0.0, 2.0], [1.0, 3.0]])
    1.5
    """
    codes = check_array(codes, accept_sparse="csr", ensure_all_finite=False)
    if hasattr(codes, "count_nonzero"):
        return float(codes.count_nonzero() / codes.shape[0])
    return float(np.count_nonzero(codes) / codes.shape[0])


def explained_variance(X, X_hat):
    """Fraction of the variance of ``X`` that ``X_hat`` explains (1 - FVU).

    Defined as ``1 - sum((X - X_hat)**2) / sum((X - X.mean(axis=0))**2)``, the sums
    running over all rows and columns. This is exactly
    ``sklearn.metrics.r2_score(X, X_hat, multioutput="variance_weighted")``: the
    per-column R² weighted by each column's variance. It is not the mean of per-row or
    per-column ratios, which weight low-variance directions too much.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Inputs.
    X_hat : array-like of shape (n_samples, n_features)
        Reconstructions.

    Returns
    -------
    score : float
        1.0 for a perfect reconstruction, 0.0 for predicting the column means; NaN
        (with an `UndefinedMetricWarning`) for fewer than two rows, as in sklearn.

    Examples
    --------
    >>> explained_variance([[0.0, 1.0], [2.0, 3.0]], [[0.0, 1.0], [2.0, 3.0]])
    1.0
    """
    X = check_array(X, dtype=np.float64)
    X_hat = check_array(X_hat, dtype=np.float64)
    if X.shape != X_hat.shape:
        raise ValueError(f"X and X_hat must have the same shape, got {X.shape} and {X_hat.shape}.")
    accumulator = ExplainedVarianceAccumulator(shift=X[0])
    accumulator.update(X, X_hat)
    return accumulator.result()


class ExplainedVarianceAccumulator:
    """Streamed `explained_variance`: feed chunks with `update`, then call `result`.

    Keeps float64 sums of squared errors and of the shifted inputs and their squares
    per column. Shifting by a value near the mean (the decoder bias, the first row)
    avoids the cancellation of ``sum(x**2) - n * mean**2`` for offset data.

    Parameters
    ----------
    shift : array-like of shape (n_features,)
        Subtracted from the inputs before their sums are taken.
    """

    def __init__(self, shift):
        self.shift = np.asarray(shift, dtype=np.float64)
        self.n_rows = 0
        self.squared_error = 0.0
        self.sum_D = np.zeros_like(self.shift)
        self.sum_squares_D = np.zeros_like(self.shift)

    def update(self, X, X_hat):
        """Add a chunk of inputs and their reconstructions (arrays of equal shape)."""
        X = np.asarray(X, dtype=np.float64)
        self.squared_error += float(np.square(X - np.asarray(X_hat, dtype=np.float64)).sum())
        centred = X - self.shift
        self.sum_D += centred.sum(axis=0)
        self.sum_squares_D += np.square(centred).sum(axis=0)
        self.n_rows += X.shape[0]

    def result(self):
        """The explained variance of everything fed so far (float)."""
        if self.n_rows < 2:
            warnings.warn(
                "explained variance is not well-defined with fewer than two samples.",
                UndefinedMetricWarning,
                stacklevel=3,
            )
            return float("nan")
        total = float((self.sum_squares_D - np.square(self.sum_D) / self.n_rows).sum())
        if total <= 0.0:
            # Constant inputs: sklearn's force_finite convention.
            return 1.0 if self.squared_error == 0.0 else 0.0
        return float(1.0 - self.squared_error / total)


class LossRecovered(NamedTuple):
    """Loss recovered with the cross-entropies and KL divergences it comes from."""

    score: float
    """(ce_ablated - ce_sae) / (ce_ablated - ce_clean)."""
    ce_clean: float
    """Cross-entropy of the unmodified model (nats per predicted token)."""
    ce_sae: float
    """Cross-entropy with the SAE's reconstruction spliced in."""
    ce_ablated: float
    """Cross-entropy with the ablation spliced in."""
    kl_sae: float
    """Mean KL(clean || SAE-spliced) per predicted token."""
    kl_ablated: float
    """Mean KL(clean || ablated) per predicted token."""


def loss_recovered(sae, extractor, texts, ablation="zero"):
    """Fraction of the cross-entropy lost by ablating the hook that the SAE gives back.

    ``(CE_ablated - CE_sae) / (CE_ablated - CE_clean)``: 1 when splicing the SAE's
    reconstruction in leaves the model's loss unchanged, 0 when it is as bad as the
    ablation. See `loss_recovered_details` for the terms.

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted on activations of ``extractor``'s hook.
    extractor : ActivationExtractor
        The model and hook point; its position rules decide what is spliced.
    texts : list of str
        Held-out texts.
    ablation : {"zero", "mean"}, default="zero"
        The baseline: zeros, or the mean activation over the kept tokens of ``texts``.

    Returns
    -------
    score : float
    """
    return loss_recovered_details(sae, extractor, texts, ablation=ablation).score


def loss_recovered_details(sae, extractor, texts, ablation="zero"):
    """`loss_recovered` with the cross-entropies and KL divergences behind it.

    The SAE and the ablation replace the activation at the same positions: those
    ``extractor.extract`` keeps (by default every token but the first of each context
    and special tokens, whose activations the SAE never saw). Cross-entropy is averaged
    over every next-token prediction of every context.

    Parameters
    ----------
    sae, extractor, texts, ablation
        See `loss_recovered`.

    Returns
    -------
    details : LossRecovered
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(sae)
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}.")
    model, _ = extractor._load()
    device = next(model.parameters()).device
    module = sae._inference_module(device)

    def reconstruct(hidden_BSD):
        if hidden_BSD.shape[-1] != sae.n_features_in_:
            raise ValueError(
                f"The hook gives {hidden_BSD.shape[-1]} features, but the SAE was fitted on "
                f"{sae.n_features_in_}."
            )
        x_ND = hidden_BSD.reshape(-1, hidden_BSD.shape[-1]).float()
        return module.decode(module.encode(x_ND)).reshape(hidden_BSD.shape)

    if ablation == "zero":

        def ablate(hidden_BSD):
            return torch.zeros_like(hidden_BSD)

    else:
        mean_D = torch.from_numpy(extractor.extract(texts).activations.mean(axis=0)).to(device)

        def ablate(hidden_BSD):
            return mean_D.to(hidden_BSD.dtype).expand_as(hidden_BSD)

    losses = extractor.spliced_losses(texts, {"sae": reconstruct, "ablated": ablate})
    ce_sae, ce_ablated = losses.spliced["sae"], losses.spliced["ablated"]
    return LossRecovered(
        score=(ce_ablated - ce_sae) / (ce_ablated - losses.clean),
        ce_clean=losses.clean,
        ce_sae=ce_sae,
        ce_ablated=ce_ablated,
        kl_sae=losses.kl["sae"],
        kl_ablated=losses.kl["ablated"],
    )
