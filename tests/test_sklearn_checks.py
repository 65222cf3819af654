"""scikit-learn conformance: every common check, for every architecture."""

import pytest
from sklearn.utils.estimator_checks import check_param_validation, parametrize_with_checks

from skSAE import SparseAutoencoder
from skSAE._architectures import ARCHITECTURES

INSTANCES = [
    SparseAutoencoder(n_components=8, k=4, architecture=name, max_iter=2, random_state=0)
    for name in sorted(ARCHITECTURES)
]


# No expected failures: every check passes as it is.
@parametrize_with_checks(INSTANCES)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


@pytest.mark.parametrize("estimator", INSTANCES, ids=lambda est: est.architecture)
def test_param_validation_covers_every_parameter(estimator):
    # check_estimator skips this one; it proves _parameter_constraints is complete.
    check_param_validation(type(estimator).__name__, estimator)
