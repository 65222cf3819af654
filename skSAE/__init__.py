"""skSAE: sparse autoencoders for mechanistic interpretability, with a scikit-learn face."""

from . import io
from ._estimator import SparseAutoencoder, TrainingDivergedError, TrainingInterruptedWarning
from ._version import __version__
from .cache import ActivationCache
from .extraction import ActivationExtractor

__all__ = [
    "ActivationCache",
    "ActivationExtractor",
    "SparseAutoencoder",
    "TrainingDivergedError",
    "TrainingInterruptedWarning",
    "__version__",
    "io",
]
