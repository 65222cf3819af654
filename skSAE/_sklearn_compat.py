"""The only module that imports private scikit-learn names, and version shims.

A change in scikit-learn's private API then needs one fix, here.
"""

import sklearn
from sklearn.base import _fit_context
from sklearn.utils._param_validation import (
    HasMethods,
    Interval,
    StrOptions,
    validate_parameter_constraints,
    validate_params,
)
from sklearn.utils.fixes import parse_version

__all__ = [
    "HasMethods",
    "l1_logistic_regression",
    "Interval",
    "StrOptions",
    "_fit_context",
    "validate_parameter_constraints",
    "validate_params",
]


def l1_logistic_regression(**params):
    """`LogisticRegression` with a pure L1 penalty on every supported scikit-learn.

    scikit-learn 1.8 moved the penalty's choice to ``l1_ratio`` (``penalty`` deprecated);
    before it, ``l1_ratio`` without ``penalty="l1"`` is ignored and the penalty is L2.
    """
    from sklearn.linear_model import LogisticRegression

    if parse_version(sklearn.__version__).release >= (1, 8):
        return LogisticRegression(l1_ratio=1.0, **params)
    return LogisticRegression(penalty="l1", **params)
