"""The only module that imports private scikit-learn names.

A change in scikit-learn's private API then needs one fix, here.
"""

from sklearn.base import _fit_context
from sklearn.utils._param_validation import (
    HasMethods,
    Interval,
    StrOptions,
    validate_parameter_constraints,
    validate_params,
)

__all__ = [
    "HasMethods",
    "Interval",
    "StrOptions",
    "_fit_context",
    "validate_parameter_constraints",
    "validate_params",
]
