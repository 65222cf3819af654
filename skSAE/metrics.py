"""Quality metrics of a sparse autoencoder, and scorers for model selection.

The public face of three modules: the metric functions on arrays
(`skSAE._array_metrics`, no torch), loss recovered (`skSAE._loss_recovered`, which
splices an SAE into the model) and the scorers with the Pareto refit
(`skSAE._scoring`); plus `plot_frontier` from `skSAE.plotting`.
"""

from ._array_metrics import (
    ExplainedVarianceAccumulator,
    cosine_similarity,
    dead_fraction,
    explained_variance,
    fraction_variance_unexplained,
    latent_density,
    mean_l0,
    normalized_mse,
)
from ._loss_recovered import LossRecovered, loss_recovered, loss_recovered_details
from ._scoring import (
    LossRecoveredScorer,
    ParetoRefit,
    SparseProbingScorer,
    cosine_similarity_scorer,
    explained_variance_scorer,
    get_scorer,
    get_scorer_names,
    loss_recovered_scorer,
    neg_dead_fraction_scorer,
    neg_fvu_scorer,
    neg_l0_scorer,
    pareto_front,
    pareto_refit,
    sae_scoring,
)
from .plotting import plot_frontier

__all__ = [
    "ExplainedVarianceAccumulator",
    "LossRecovered",
    "LossRecoveredScorer",
    "ParetoRefit",
    "SparseProbingScorer",
    "cosine_similarity",
    "cosine_similarity_scorer",
    "dead_fraction",
    "explained_variance",
    "explained_variance_scorer",
    "fraction_variance_unexplained",
    "get_scorer",
    "get_scorer_names",
    "latent_density",
    "loss_recovered",
    "loss_recovered_details",
    "loss_recovered_scorer",
    "mean_l0",
    "neg_dead_fraction_scorer",
    "neg_fvu_scorer",
    "neg_l0_scorer",
    "normalized_mse",
    "pareto_front",
    "pareto_refit",
    "plot_frontier",
    "sae_scoring",
]
