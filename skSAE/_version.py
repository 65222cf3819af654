"""The package version, and the check of the version a pickle was saved with.

A leaf that every module may import.
"""

import warnings

__version__ = "0.1.0"


def pop_saved_version(state, owner):
    """Remove the saved ``_sksae_version`` from a pickled ``state``; warn if it differs.

    Parameters
    ----------
    state : dict
        The ``__dict__`` being restored by ``__setstate__``; modified in place.
    owner : str
        The class name, for the message.
    """
    version = state.pop("_sksae_version", None)
    if version != __version__:
        warnings.warn(
            f"This {owner} was saved with skSAE {version} and is loaded with skSAE "
            f"{__version__}; check its outputs.",
            UserWarning,
            stacklevel=3,  # the caller of pickle.load / joblib.load, above __setstate__
        )
