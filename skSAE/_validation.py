"""Argument checks that depend on runtime values, in `validate_params`'s dialect.

Public functions declare their argument types and ranges with scikit-learn's
`validate_params` decorator (through `skSAE._sklearn_compat`). What a decorator cannot
see, such as a latent index against the SAE's ``n_components``, is checked here, and
the error reads like the decorator's: the parameter, the function, what is expected and
what was received. A leaf module: it imports nothing from skSAE.
"""

from numbers import Integral

__all__ = ["check_latents", "invalid_parameter"]


def invalid_parameter(name, caller, expected, received):
    """The `ValueError` for parameter ``name`` of ``caller``.

    Parameters
    ----------
    name : str
        The parameter, as the caller's signature spells it.
    caller : str
        The public function (or method) that received it.
    expected : str
        What the parameter must be, phrased to follow "must be".
    received : str
        What it was, already formatted (usually a ``repr``).

    Returns
    -------
    error : ValueError
        To be raised by the caller.

    Examples
    --------
    >>> str(invalid_parameter("k", "f", "an int >= 1", repr(0)))
    "The 'k' parameter of f must be an int >= 1. Got 0 instead."
    """
    return ValueError(
        f"The {name!r} parameter of {caller} must be {expected}. Got {received} instead."
    )


def check_latents(latents, n_components, name, caller, *, allow_empty=False):
    """Distinct latent indices in the order given, each in ``0 .. n_components - 1``.

    Parameters
    ----------
    latents : int or iterable of int
        One latent, or several (duplicates are dropped, the first kept).
    n_components : int
        The SAE's number of latents.
    name, caller : str
        The parameter and the public function, for the error message.
    allow_empty : bool, default=False
        Whether no latent at all is acceptable.

    Returns
    -------
    latents : list of int

    Raises
    ------
    ValueError
        When an entry is not an integer (a bool is not), is out of range, or when there
        is no entry and `allow_empty` is False.

    Examples
    --------
    >>> check_latents([3, 1, 3], 4, "latents", "f")
    [3, 1]
    >>> check_latents(7, 4, "latents", "f")
    Traceback (most recent call last):
    ...
    ValueError: The 'latents' parameter of f must be latent indices, ... Got 7 instead.
    """
    expected = f"latent indices, ints in [0, {n_components}) (n_components of the SAE)"
    if _is_int(latents):
        values, received = [latents], None
    elif isinstance(latents, (str, bytes)) or not hasattr(latents, "__iter__"):
        raise invalid_parameter(name, caller, expected, repr(latents))
    else:
        values, received = list(latents), _short_repr(latents)
    checked = []
    for value in values:
        if not _is_int(value) or not 0 <= value < n_components:
            shown = repr(value) if received is None else f"{value!r} in {received}"
            raise invalid_parameter(name, caller, expected, shown)
        if int(value) not in checked:
            checked.append(int(value))
    if not checked and not allow_empty:
        raise invalid_parameter(name, caller, f"one or more {expected}", repr(latents))
    return checked


def _is_int(value):
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _short_repr(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
