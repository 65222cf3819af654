"""Reconstruction diagnostics of a fitted SAE, in one streaming pass over activations.

Public through `skSAE.evaluation`. NumPy only (the SAE's `transform` and
`inverse_transform` do the encoding): bounded memory over data of any size, float64
sums, no per-chunk ratios averaged.

Shape suffixes: N rows, D features, F latents.
"""

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ._array_metrics import ExplainedVarianceAccumulator
from .cache import iter_chunks

CODE_BYTES = 64 * 2**20
"""Bytes of dense float32 codes `reconstruction_diagnostics` makes at a time."""

DENSE_DENSITY = 0.1
"""A latent active on more than this fraction of tokens counts as dense (SAEBench)."""


class DiagnosticsAccumulator:
    """Feed activations chunk by chunk with `update`; `result` gives the diagnostics.

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted; its `transform` (and so its ``transform_algorithm``) makes the codes.
    """

    def __init__(self, sae):
        check_is_fitted(sae)
        self.sae = sae
        self.n_rows = 0
        self.explained = ExplainedVarianceAccumulator()
        self.fires_F = np.zeros(sae.components_.shape[0], np.int64)
        self.cosine_sum = 0.0
        self.norm_ratio_sum = 0.0
        self.n_nonzero_rows = 0
        self.reconstruction_squares = 0.0
        self.input_dot_reconstruction = 0.0

    def update(self, X_ND, codes_NF=None, X_hat_ND=None):
        """Add a chunk of activations, with its codes and reconstructions if made already.

        Parameters
        ----------
        X_ND : array-like or torch.Tensor of shape (n_rows, n_features)
        codes_NF, X_hat_ND : array-like or torch.Tensor, default=None
            The chunk's codes and reconstructions (a caller that encoded it on a device
            passes them: only the firing counts and the reconstructions come to the
            host); `transform` and `inverse_transform` make them when None.
        """
        if X_ND.shape[0] == 0:
            return
        if codes_NF is None:
            X_ND = np.asarray(X_ND, dtype=np.float32)
            codes_NF = self.sae.transform(X_ND)
            X_hat_ND = self.sae.inverse_transform(codes_NF)
        fires_F = (codes_NF != 0).sum(axis=0)
        self.fires_F += np.asarray(fires_F.cpu() if hasattr(fires_F, "cpu") else fires_F).ravel()
        X_ND, X_hat_ND = _host_float64(X_ND), _host_float64(X_hat_ND)
        self.explained.update(X_ND, X_hat_ND)
        norms_N = np.linalg.norm(X_ND, axis=1)
        hat_norms_N = np.linalg.norm(X_hat_ND, axis=1)
        dots_N = np.einsum("nd,nd->n", X_ND, X_hat_ND)
        rows = norms_N > 0
        self.n_nonzero_rows += int(rows.sum())
        self.norm_ratio_sum += float((hat_norms_N[rows] / norms_N[rows]).sum())
        both = rows & (hat_norms_N > 0)  # a zero row counts as cosine 0, as in metrics
        self.cosine_sum += float((dots_N[both] / (norms_N[both] * hat_norms_N[both])).sum())
        self.reconstruction_squares += float(np.square(hat_norms_N).sum())
        self.input_dot_reconstruction += float(dots_N.sum())
        self.n_rows += X_ND.shape[0]

    def result(self, n_bins=40, dictionary=True):
        """The diagnostics of everything fed so far (see `reconstruction_diagnostics`).

        ``dictionary=False`` leaves out the decoder and encoder cosines (a Gram matrix
        of the dictionary: seconds at 100k latents), for callers that only show the
        rest.
        """
        if self.n_rows == 0:
            raise ValueError("no activations were given: the diagnostics need at least one row.")
        density_F = self.fires_F / self.n_rows
        live = density_F[density_F > 0]
        edges = np.linspace(np.log10(1.0 / self.n_rows), 0.0, n_bins + 1)
        counts, edges = np.histogram(np.log10(live), bins=edges)
        rows = max(self.n_nonzero_rows, 1)  # the L2 ratio of a zero input is undefined
        report = {
            "n_tokens": self.n_rows,
            "mean_l0": float(self.fires_F.sum() / self.n_rows),
            "explained_variance": self.explained.result(),
            "cosine_similarity": self.cosine_sum / self.n_rows,
            "l2_ratio": self.norm_ratio_sum / rows,
            "relative_reconstruction_bias": _ratio(
                self.reconstruction_squares, self.input_dot_reconstruction
            ),
            "silent_latents": int((density_F == 0).sum()),
            "silent_fraction": float((density_F == 0).mean()),
            "dense_latents": int((density_F > DENSE_DENSITY).sum()),
            "dense_fraction": float((density_F > DENSE_DENSITY).mean()),
            "latent_density": density_F,
            "density_histogram": (counts, edges),
        }
        if dictionary:
            decoder_cosine_F = max_decoder_cosine(self.sae.components_)
            report.update(
                decoder_max_cosine_mean=float(decoder_cosine_F.mean()),
                decoder_max_cosine_max=float(decoder_cosine_F.max()),
                encoder_decoder_cosine_mean=float(
                    encoder_decoder_cosine(self.sae.W_enc_, self.sae.components_).mean()
                ),
            )
        return report


def reconstruction_diagnostics(sae, X, *, chunk_rows=None, n_bins=40):
    """How an SAE reconstructs ``X``, and how its latents and dictionary look.

    One pass over ``X`` in chunks of ``chunk_rows`` rows (an `h5py.Dataset` or memmap
    is never read whole); sums in float64.

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted.
    X : array-like, h5py.Dataset or numpy.memmap of shape (n_samples, n_features)
        Held-out activations.
    chunk_rows : int, default=None
        Rows encoded at a time; None: as many as make 64 MB of float32 codes.
    n_bins : int, default=40
        Bins of the density histogram (log10 of the fraction of tokens).

    Returns
    -------
    diagnostics : dict
        Scalars, and two arrays:

        - ``n_tokens``, ``mean_l0``, ``explained_variance``;
        - ``cosine_similarity``: mean over rows of cos(x, x_hat) (0 for a zero row, as
          `skSAE.metrics.cosine_similarity`);
        - ``l2_ratio``: mean over the non-zero rows of ||x_hat|| / ||x|| (below 1:
          shrinkage);
        - ``relative_reconstruction_bias``: the gamma that minimises
          E||x_hat / gamma - x||^2, that is E||x_hat||^2 / E[x . x_hat] (Rajamanoharan
          et al. 2024, "Improving dictionary learning with gated sparse autoencoders",
          eq. 10); 1 when unbiased, below 1 when the reconstructions shrink;
        - ``silent_latents`` / ``silent_fraction``: never active on ``X`` (on a few
          thousand held-out tokens, rare latents too; not the estimator's
          ``dead_fraction_``, the latents that did not fire in the last ``dead_window``
          rows of training);
          ``dense_latents`` / ``dense_fraction``: active on more than 10% of rows;
        - ``decoder_max_cosine_mean`` / ``_max``: for each latent, the largest cosine
          between its decoder row and any other's, averaged / at most;
        - ``encoder_decoder_cosine_mean``: mean cosine of each latent's encoder
          column and decoder row;
        - ``latent_density``: array of shape (n_components,), the fraction of rows on
          which each latent is active;
        - ``density_histogram``: ``(counts, edges)`` of log10 density over the live
          latents, edges from ``log10(1 / n_tokens)`` to 0.

    Examples
    --------
    >>> import numpy as np
    >>> from skSAE import SparseAutoencoder
    >>> X = np.random.default_rng(0).normal(size=(2000, 16)).astype(np.float32)
    >>> sae = SparseAutoencoder(n_components=32, k=4, max_iter=2, random_state=0).fit(X)
    >>> report = reconstruction_diagnostics(sae, X)
    >>> report["mean_l0"]
    4.0
    """
    accumulator = DiagnosticsAccumulator(sae)
    if chunk_rows is None:
        chunk_rows = max(1, CODE_BYTES // (4 * sae.components_.shape[0]))
    for _, block in iter_chunks(X, chunk_rows):
        accumulator.update(block)
    return accumulator.result(n_bins)


def max_decoder_cosine(components_FD, block_rows=2048):
    """For each dictionary row, the largest cosine with any other row.

    Parameters
    ----------
    components_FD : ndarray of shape (n_components, n_features)
        The decoder rows.
    block_rows : int, default=2048
        Rows of the Gram matrix held at a time (memory ``block_rows * n_components``).

    Returns
    -------
    cosine_F : ndarray of shape (n_components,)
        ``-1`` for a lone row; rows of zero norm count as cosine 0 with every other.

    Examples
    --------
    >>> max_decoder_cosine([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]).tolist()
    [1.0, 0.0, 1.0]
    """
    rows_FD = _unit_rows(components_FD)
    n_rows = rows_FD.shape[0]
    best_F = np.full(n_rows, -1.0)
    for start in range(0, n_rows, block_rows):
        gram_BF = rows_FD[start : start + block_rows] @ rows_FD.T
        index = np.arange(start, min(start + block_rows, n_rows))
        gram_BF[index - start, index] = -np.inf
        if n_rows > 1:
            best_F[index] = gram_BF.max(axis=1)
    return best_F


def encoder_decoder_cosine(W_enc_DF, components_FD):
    """Cosine between each latent's encoder column and its decoder row, shape (F,).

    Examples
    --------
    >>> encoder_decoder_cosine([[1.0, 0.0], [0.0, -1.0]], [[2.0, 0.0], [0.0, 1.0]]).tolist()
    [1.0, -1.0]
    """
    return np.einsum("fd,fd->f", _unit_rows(np.asarray(W_enc_DF).T), _unit_rows(components_FD))


def _host_float64(values):
    """A NumPy float64 copy of an array or a (device) tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _unit_rows(matrix):
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def _ratio(numerator, denominator):
    return float(numerator / denominator) if denominator != 0 else float("nan")
