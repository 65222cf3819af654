"""skSAE: sparse autoencoders for mechanistic interpretability, with a scikit-learn face."""

__version__ = "0.1.0"

from ._estimator import SparseAutoencoder, TrainingDivergedError  # noqa: E402
from .cache import ActivationCache  # noqa: E402
from .extraction import ActivationExtractor  # noqa: E402

__all__ = [
    "ActivationCache",
    "ActivationExtractor",
    "SparseAutoencoder",
    "TrainingDivergedError",
    "__version__",
]
