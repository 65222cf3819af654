"""Load and save SAEs as files: skSAE's own safe format, SAELens, sparsify, dictionary_learning.

`load` reads a folder into a fitted `SparseAutoencoder`; `save` writes one. No format
here runs code on load (no pickle): safetensors, JSON, and for dictionary_learning a
torch state dict read with ``weights_only=True``.

=========================  ====  =====  ================================================
format                     read  write  architectures
=========================  ====  =====  ================================================
``"skSAE"``                yes   yes    all six
``"saelens"`` (6.x)        yes   yes    standard, topk, jumprelu, gated (batchtopk and
                                        matryoshka are written as jumprelu)
``"sparsify"``             yes   no     topk
``"dictionary_learning"``  yes   no     AutoEncoder, AutoEncoderTopK, BatchTopKSAE,
                                        MatryoshkaBatchTopKSAE, JumpReluAutoEncoder, Gated
=========================  ====  =====  ================================================
"""

import errno
import json
import math
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import sklearn
import torch

from ._estimator import SAVED_ATTRIBUTES, SparseAutoencoder, exported_state, fitted_estimator
from ._formats import (
    DICTIONARY_LEARNING_WEIGHTS,
    SAELENS_CONFIG,
    SAELENS_SPARSITY,
    SAELENS_WEIGHTS,
    SPARSIFY_CONFIG,
    SPARSIFY_WEIGHTS,
    FormatError,
    read_dictionary_learning,
    read_json_object,
    read_saelens,
    read_safetensors,
    read_sparsify,
    tensor,
    write_json,
    write_saelens,
    write_safetensors,
)
from ._utils import resolve_device
from ._version import __version__

try:
    import fcntl
except ImportError:  # Windows: overwriting saves to one folder are not serialised
    fcntl = None

__all__ = ["FORMAT_VERSION", "FormatError", "detect_format", "load", "save"]

FORMAT_VERSION = 1
"""Version of skSAE's own layout that `save` writes; `load` reads it and older ones."""

_MODEL_FILE = "model.safetensors"
_CONFIG_FILE = "config.json"
_OWN_ATTRIBUTES = (*SAVED_ATTRIBUTES, "feature_names_in_")
_READ_FORMATS = ("skSAE", "saelens", "sparsify", "dictionary_learning")
_WRITE_FORMATS = ("skSAE", "saelens")
# The files `save` writes in each format: those that ``overwrite=True`` replaces.
_SAVED_FILES = {
    "skSAE": (_CONFIG_FILE, _MODEL_FILE),
    "saelens": (SAELENS_CONFIG, SAELENS_WEIGHTS, SAELENS_SPARSITY),
}
# Where a replacement keeps the old files until the new ones are in (inside the scratch).
_ASIDE = "previous"
# A full disk, or a full quota (EDQUOT is not defined everywhere).
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def load(path, format="auto", *, norm_scaling_factor=None):
    """Read an SAE folder into a fitted `SparseAutoencoder`.

    Parameters
    ----------
    path : str or path-like
        The folder: skSAE's (``config.json`` + ``model.safetensors``), SAELens's
        (``cfg.json`` + ``sae_weights.safetensors``, optional ``sparsity.safetensors``),
        sparsify's (``cfg.json`` + ``sae.safetensors``, one folder per hook point) or
        dictionary_learning's (``config.json`` + ``ae.pt``).
    format : {"auto", "skSAE", "saelens", "sparsify", "dictionary_learning"}, default="auto"
        ``"auto"`` tells the format from the file names.
    norm_scaling_factor : float, default=None
        For SAELens files with ``normalize_activations="expected_average_only_in"``:
        the constant the inputs were multiplied by in training, folded into the
        weights. Other formats ignore it.

    Returns
    -------
    sae : SparseAutoencoder
        Fitted. ``transform`` and ``inverse_transform`` compute what the original
        library computes: reconstructions exactly, codes times the decoder row norms
        (``components_`` rows are unit-norm; the files' rows usually are already).
        A model from another library has ``metadata_`` (the file's model, hook and
        format) and trains, with `partial_fit` or ``warm_start``, in units measured on
        the first rows it is trained on.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    FormatError
        A `ValueError` naming the file, the field and what was expected: a file, not
        a folder; no known layout; a missing or misshaped tensor; an unknown
        architecture; a truncated file; a JSON file that is not an object, or nested
        too deeply to read; a newer skSAE format version. skSAE's own files are
        checked field by field (every parameter within its constraint, every fitted
        attribute, the random state and the tensors within their ranges), so that a
        damaged file fails here rather than in a later call.

    Notes
    -----
    Fine-tuning a loaded model (`partial_fit`, or `fit` with ``warm_start=True``)
    keeps its architecture, dictionary size and weights and starts a fresh Adam
    state. ``k`` and ``target_l0`` may be changed with `set_params`; the dictionary
    size and input width cannot. The sparsity coefficient of an imported ReLU, gated
    or JumpReLU model is unknown: it starts from `l1_coefficient` or `l0_coefficient`
    (in training units), so pass ``target_l0`` to keep its sparsity.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from skSAE import SparseAutoencoder, io
    >>> X = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    >>> sae = SparseAutoencoder(n_components=16, k=2, max_iter=1, random_state=0).fit(X)
    >>> folder = tempfile.mkdtemp()
    >>> io.save(sae, folder, overwrite=True)
    >>> bool((io.load(folder).transform(X) == sae.transform(X)).all())
    True
    """
    folder = _existing_folder(path)
    if format == "auto":
        format = detect_format(folder)
    elif format not in _READ_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {list(_READ_FORMATS)}, got {format!r}.")
    if format == "skSAE":
        return _load_own(folder)
    if format == "saelens":
        imported = read_saelens(folder, norm_scaling_factor=norm_scaling_factor)
    elif format == "sparsify":
        imported = read_sparsify(folder)
    else:
        imported = read_dictionary_learning(folder)
    n_components = imported.state["W_enc_"].shape[1]
    params = {"architecture": imported.architecture, "n_components": n_components}
    params.update(imported.params)
    return fitted_estimator(
        params,
        imported.state,
        attributes={"metadata_": imported.metadata},
        scale_from_data=True,
    )


def detect_format(path):
    """The format of an SAE folder, from its file names (see `load`).

    Raises
    ------
    FormatError
        When the folder matches no format; names the files each format needs.
    """
    folder = Path(path)
    names = {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()
    if {_CONFIG_FILE, _MODEL_FILE} <= names:
        return "skSAE"
    if {SAELENS_CONFIG, SAELENS_WEIGHTS} <= names:
        return "saelens"
    if {SPARSIFY_CONFIG, SPARSIFY_WEIGHTS} <= names:
        return "sparsify"
    if DICTIONARY_LEARNING_WEIGHTS in names:
        return "dictionary_learning"
    sparsify_files = {SPARSIFY_CONFIG, SPARSIFY_WEIGHTS}
    hook_points = sorted(
        entry.name
        for entry in (folder.iterdir() if folder.is_dir() else ())
        if entry.is_dir() and sparsify_files <= {e.name for e in entry.iterdir()}
    )
    hint = ""
    if hook_points:
        hint = f" It holds one sparsify SAE per hook point: load one of {hook_points}."
    raise FormatError(
        f"{folder} holds no SAE skSAE recognises (found {sorted(names) or 'nothing'}). "
        f"Expected {_CONFIG_FILE} + {_MODEL_FILE} (skSAE), {SAELENS_CONFIG} + "
        f"{SAELENS_WEIGHTS} (SAELens), {SPARSIFY_CONFIG} + {SPARSIFY_WEIGHTS} (sparsify) "
        f"or {DICTIONARY_LEARNING_WEIGHTS} + config.json (dictionary_learning).{hint}"
    )


def save(sae, path, format="skSAE", *, overwrite=False, **metadata):
    """Write a fitted `SparseAutoencoder` to a folder.

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted.
    path : str or path-like
        The folder to create, or an empty folder.
    format : {"skSAE", "saelens"}, default="skSAE"
        ``"skSAE"``: ``model.safetensors`` (the fitted arrays) and ``config.json``
        (parameters, fitted scalars, versions, metadata); `load` rebuilds the model
        exactly. ``"saelens"``: SAELens 6's ``cfg.json`` + ``sae_weights.safetensors``
        (+ ``sparsity.safetensors`` when `latent_frequency_` is known), for
        ``sae_lens.SAE.load_from_disk``.
    overwrite : bool, default=False
        Replace the SAE in an existing folder. Only the files of the SAE are replaced
        (``config.json`` and ``model.safetensors``, or SAELens's three): any other
        file or folder in it (notes, logs) is kept, as ``save_pretrained`` keeps them.
        A folder that holds no SAE, or one of a format `save` does not write
        (sparsify, dictionary_learning), is refused.
    **metadata
        JSON values recorded with the model, over those of ``sae.metadata_``; e.g.
        ``**extractor.hook_metadata()`` (model, hook in TransformerLens and Hugging
        Face spelling, context size), which SAELens reads from its ``metadata``.

    Raises
    ------
    FileExistsError
        When ``path`` is a file, or holds files and ``overwrite`` is false (also when
        another process saved there while this save was writing: of several saves
        to one new folder, exactly one succeeds), or when ``overwrite`` is true and
        the folder holds no SAE that `save` writes.
    OSError
        When the disk is full (``errno.ENOSPC``; the message names the folder).
    ValueError
        When a metadata value is not JSON.

    Notes
    -----
    The files are written to a hidden folder beside ``path`` and flushed to the disk
    before anything at ``path`` changes, so an error while writing (a full disk) or
    a kill leaves ``path`` as it was. A new folder then appears whole, in one
    rename; with ``overwrite``, the old SAE's files move out (its config first) and
    the new ones in (config last), so ``path`` never holds a config with the other
    model's weights, and concurrent overwriting saves take turns (a lock on the
    folder, where the system has ``fcntl``).
    """
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"save expects a SparseAutoencoder, got {type(sae).__name__}.")
    if format not in _WRITE_FORMATS:
        raise ValueError(f"format must be one of {list(_WRITE_FORMATS)}, got {format!r}.")
    saved = exported_state(sae)
    metadata = {
        **{k: v for k, v in getattr(sae, "metadata_", {}).items() if k != "format"},
        **metadata,
    }
    for key, value in metadata.items():
        try:
            json.dumps(value)
        except TypeError as exc:
            raise ValueError(f"metadata {key!r} is not a JSON value: {value!r}.") from exc
    target = Path(path)
    _replaced_files(target, overwrite)  # refuse before the work of writing
    scratch = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(scratch, 0o777 & ~umask)  # mkdtemp's folder is private to its owner
        if format == "skSAE":
            _write_own(scratch, sae, saved, metadata)
        else:
            k = saved["fit_options"].get("k") if saved["architecture"] == "topk" else None
            write_saelens(scratch, saved["arrays"], saved["architecture"], k=k, metadata=metadata)
        if _claim(scratch, target):
            scratch = None  # it is the folder now
        elif not overwrite:
            raise FileExistsError(
                f"{target} was written by another process while this save was writing; it "
                "is left as that process wrote it. Pass overwrite=True to replace it, or "
                "choose another path."
            )
        else:
            _replace_files(scratch, target)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise OSError(
                exc.errno,
                f"No space left on the disk of {target.parent} to save {target.name!r}: "
                f"{target} is as it was before this save (its partial files are removed). "
                "Free some space, or save elsewhere",
            ) from exc
        raise
    finally:
        # An aside folder left in the scratch holds files that a failed replacement could
        # not put back (its error names the folder): those are kept.
        if scratch is not None and not (scratch / _ASIDE).exists():
            shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------ own format


def _write_own(folder, sae, saved, metadata):
    params = {name: _json_value(value) for name, value in sae.get_params(deep=False).items()}
    if params.get("prefix_sizes") is not None:
        params["prefix_sizes"] = [int(size) for size in params["prefix_sizes"]]
    if isinstance(params.get("random_state"), np.random.RandomState):
        params["random_state"] = None  # a RandomState instance has no JSON form
    params["logger"] = None  # a live object, not part of the model
    if params.get("checkpoint_path") is not None:
        params["checkpoint_path"] = os.fspath(params["checkpoint_path"])
    arrays = {name: np.array(value, order="C") for name, value in saved["arrays"].items()}
    training = saved["training_state"]
    for name in ("random_keys", "rows_since_fired"):
        if name in training:
            arrays[f"training.{name}"] = np.array(training[name], order="C")
    training_scalars = {
        name: value for name, value in training.items() if not isinstance(value, np.ndarray)
    }
    write_safetensors(arrays, folder / _MODEL_FILE)
    config = {
        "format": "skSAE",
        "format_version": FORMAT_VERSION,
        "versions": {
            "skSAE": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "architecture": saved["architecture"],
        "fit_options": saved["fit_options"],
        "params": params,
        "attributes": saved["attributes"],
        "training_state": training_scalars,
        "scale_from_data": saved["scale_from_data"],
        "metadata": metadata,
    }
    write_json(config, folder / _CONFIG_FILE, default=_json_value)


def _load_own(folder):
    config_path, weights_path = folder / _CONFIG_FILE, folder / _MODEL_FILE
    config = read_json_object(config_path)
    if config.get("format") != "skSAE":
        raise _invalid(config_path, "format", config.get("format"), "'skSAE'")
    version = config.get("format_version")
    if not _whole(version):
        raise _invalid(config_path, "format_version", version, "an integer")
    versions = config.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise _invalid(config_path, "versions", versions, "an object of version strings")
    if version > FORMAT_VERSION:
        written_by = versions.get("skSAE", "a newer skSAE")
        raise FormatError(
            f"{config_path} has format_version {version}, written by skSAE {written_by}; this "
            f"skSAE {__version__} reads format versions up to {FORMAT_VERSION}. Upgrade skSAE."
        )
    for name in ("params", "attributes", "fit_options", "metadata"):
        if not isinstance(config.get(name), dict):
            raise _invalid(config_path, name, config.get(name), "an object")
    training = config.get("training_state", {})
    if not isinstance(training, dict):
        raise _invalid(config_path, "training_state", training, "an object")
    scale_from_data = config.get("scale_from_data", False)
    if not isinstance(scale_from_data, bool):
        raise _invalid(config_path, "scale_from_data", scale_from_data, "true or false")
    unknown_attributes = sorted(set(config["attributes"]) - set(_OWN_ATTRIBUTES))
    if unknown_attributes:
        raise FormatError(
            f"{config_path}: field 'attributes' names {unknown_attributes}, which are not "
            f"fitted attributes skSAE saves ({sorted(_OWN_ATTRIBUTES)})."
        )
    known = SparseAutoencoder().get_params()
    params = {key: value for key, value in config["params"].items() if key in known}
    unknown = sorted(set(config["params"]) - set(known))
    if unknown:
        warnings.warn(
            f"{config_path}: ignoring parameters this skSAE does not have: {unknown}.",
            UserWarning,
            stacklevel=3,
        )
    _check_parameters({"architecture": config.get("architecture")}, config_path, "")
    _check_parameters(params, config_path, "params.")
    _check_parameters(config["fit_options"], config_path, "fit_options.")
    if isinstance(params.get("device"), str):
        try:
            resolve_device(params["device"])
        except (ValueError, RuntimeError):
            warnings.warn(
                f"{config_path}: saved with device={params['device']!r}, which this machine "
                "does not have; loaded with device='auto'.",
                UserWarning,
                stacklevel=3,
            )
            params["device"] = "auto"
    arrays = read_safetensors(weights_path)
    _check_arrays(arrays, weights_path)
    n_features = arrays["W_enc_"].shape[0]
    _check_attributes(config["attributes"], config_path, n_features)
    training_state = _training_state(training, arrays, config_path, weights_path)
    try:
        sae = fitted_estimator(
            params,
            {name: value for name, value in arrays.items() if not name.startswith("training.")},
            architecture=config["architecture"],
            fit_options=config["fit_options"],
            attributes={**config["attributes"], "metadata_": config["metadata"]},
            training_state=training_state,
            scale_from_data=scale_from_data,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise FormatError(f"{folder}: {exc}") from exc
    if not config["metadata"]:
        del sae.metadata_
    return sae


# ---------------------------------------------------- checks of the own format

# The tensors of model.safetensors: name -> shape, in terms of D (n_features) and F
# (n_components); ``threshold_`` is () or (F,) by architecture (`fitted_estimator`).
_OWN_TENSORS = {
    "W_enc_": ("D", "F"),
    "b_enc_": ("F",),
    "components_": ("F", "D"),
    "b_dec_": ("D",),
    "threshold_": None,
    "input_mean_": ("D",),
    "latent_frequency_": ("F",),
    "training.random_keys": (624,),  # NumPy's MT19937 key
    "training.rows_since_fired": ("F",),
}
_REQUIRED_TENSORS = ("W_enc_", "b_enc_", "components_", "b_dec_")


def _finite_number(value):
    """A JSON number (not a boolean) that is finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _whole(value, low=0, high=2**63 - 1):
    """A JSON integer (not a boolean) in [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


# Each fitted attribute of config.json: the test it must pass and what that means.
_ATTRIBUTE_CHECKS = {
    "input_scale_": (lambda v: _finite_number(v) and v > 0, "a positive number"),
    "sparsity_coefficient_": (lambda v: _finite_number(v) and v >= 0, "a number >= 0"),
    "dead_fraction_": (lambda v: _finite_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "loss_curve_": (
        lambda v: isinstance(v, list) and all(_finite_number(x) for x in v),
        "a list of finite numbers",
    ),
    "batch_size_": (lambda v: _whole(v, low=1), "a positive integer"),
    "learning_rate_": (lambda v: _finite_number(v) and v > 0, "a positive number"),
    "warmup_steps_": (_whole, "an integer >= 0"),
    "n_iter_": (_whole, "an integer >= 0"),
    "n_steps_": (_whole, "an integer >= 0"),
}
# The random state and dead-latent counters in config.json's training_state.
_TRAINING_CHECKS = {
    "random_position": (lambda v: _whole(v, high=624), "an integer in [0, 624]"),
    "random_has_gauss": (lambda v: _whole(v, high=1), "0 or 1"),
    "random_cached_gaussian": (_finite_number, "a finite number"),
    "rows_seen": (_whole, "an integer >= 0"),
}


def _invalid(path, field, value, expected):
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return FormatError(f"{path}: field {field!r} is {shown}, expected {expected}.")


def _check_parameters(values, path, prefix):
    """Each value within the constraint of the `SparseAutoencoder` parameter it names."""
    known = SparseAutoencoder().get_params()
    for name, value in values.items():
        if name not in known:
            raise FormatError(
                f"{path}: field {prefix + name!r} is not a SparseAutoencoder parameter."
            )
        try:
            SparseAutoencoder(**{name: value})._validate_params()
        except ValueError as exc:
            raise FormatError(f"{path}: field {prefix + name!r}: {exc}") from None


def _check_arrays(arrays, path):
    """The tensors of model.safetensors: known names, shapes, finite values, ranges."""
    unknown = sorted(set(arrays) - set(_OWN_TENSORS))
    if unknown:
        raise FormatError(
            f"{path} holds tensors {unknown}, which skSAE does not save (it saves "
            f"{sorted(_OWN_TENSORS)})."
        )
    for name in _REQUIRED_TENSORS:
        if name not in arrays:
            raise FormatError(f"{path} has no tensor {name!r}.")
    if arrays["W_enc_"].ndim != 2:
        raise FormatError(
            f"{path}: tensor 'W_enc_' has shape {arrays['W_enc_'].shape}, expected "
            "(n_features, n_components)."
        )
    sizes = dict(zip("DF", arrays["W_enc_"].shape, strict=True))
    for name, value in arrays.items():
        shape = _OWN_TENSORS[name]
        if shape is None:  # threshold_: one, or one per latent
            if value.shape not in ((), (sizes["F"],)):
                raise FormatError(
                    f"{path}: tensor {name!r} has shape {value.shape}, expected () or "
                    f"({sizes['F']},)."
                )
            shape = value.shape
        tensor(arrays, name, tuple(sizes.get(size, size) for size in shape), path)
    for name, valid, expected in (
        ("latent_frequency_", lambda v: (v >= 0) & (v <= 1), "fractions in [0, 1]"),
        ("training.rows_since_fired", lambda v: v >= 0, "counts >= 0"),
        (
            "training.random_keys",
            lambda v: (v >= 0) & (v < 2**32) & (v == np.round(v)),
            "integers in [0, 2**32)",
        ),
    ):
        value = arrays.get(name)
        if value is not None and not valid(value).all():
            raise FormatError(
                f"{path}: tensor {name!r} holds values from {value.min():.6g} to "
                f"{value.max():.6g}, expected {expected}."
            )


def _check_attributes(attributes, path, n_features):
    for name, value in attributes.items():
        if name == "feature_names_in_":
            valid = (
                isinstance(value, list)
                and len(value) == n_features
                and all(isinstance(item, str) for item in value)
            )
            expected = f"a list of {n_features} strings (one per input feature)"
        else:
            check, expected = _ATTRIBUTE_CHECKS[name]
            valid = check(value)
        if not valid:
            raise _invalid(path, f"attributes.{name}", value, expected)


def _training_state(state, arrays, config_path, weights_path):
    """`fitted_estimator`'s ``training_state`` from both files, checked; None when absent."""
    counters = "training.rows_since_fired" in arrays
    if "training.random_keys" not in arrays:
        if state or counters:
            raise FormatError(
                f"{weights_path} has no tensor 'training.random_keys', which the training "
                f"state in {config_path} needs."
            )
        return None
    expected = {"random_position", "random_has_gauss", "random_cached_gaussian"}
    if counters:
        expected.add("rows_seen")
    if set(state) != expected:
        raise FormatError(
            f"{config_path}: field 'training_state' has the fields {sorted(state)}, expected "
            f"{sorted(expected)} (with the tensors in {weights_path.name})."
        )
    for name, value in state.items():
        check, meaning = _TRAINING_CHECKS[name]
        if not check(value):
            raise _invalid(config_path, f"training_state.{name}", value, meaning)
    return {
        **state,
        **{
            name[len("training.") :]: value
            for name, value in arrays.items()
            if name.startswith("training.")
        },
    }


# -------------------------------------------------------------------- helpers


def _json_value(value):
    """NumPy scalars (what a grid search passes) as the Python numbers JSON holds."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _existing_folder(path):
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist.")
    if not folder.is_dir():
        raise FormatError(
            f"{folder} is a file; load expects the folder that holds an SAE's files "
            f"(try {folder.parent})."
        )
    return folder


def _replaced_files(target, overwrite):
    """The files of ``target`` that saving there with ``overwrite`` replaces.

    Raises `FileExistsError` when ``target`` is a file, or holds files and
    ``overwrite`` is false, or holds no SAE that `save` writes.
    """
    if target.is_file():
        raise FileExistsError(f"{target} is a file; save writes a folder.")
    names = {entry.name for entry in target.iterdir()} if target.is_dir() else set()
    if not names:
        return []
    if not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty; pass overwrite=True to replace the SAE in it."
        )
    try:
        found = detect_format(target)
    except FormatError:
        found = None
    if found not in _SAVED_FILES:
        what = f"a {found} SAE" if found else "files that are not an SAE"
        raise FileExistsError(
            f"{target} holds {what}; overwrite=True replaces only an SAE that save writes "
            f"(skSAE's or SAELens's files), never other files. Choose another path."
        )
    return [name for name in _SAVED_FILES[found] if name in names]


def _claim(scratch, target):
    """Rename the folder ``scratch`` to ``target`` if that is free (missing or empty).

    One rename is atomic: of two saves to one new folder, the second finds it filled
    by the first and gets False.
    """
    try:
        os.rename(scratch, target)
    except OSError as exc:
        # A folder that is not empty, a file, or (Windows) any existing folder.
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            return False
        raise
    return True


def _replace_files(scratch, target):
    """Swap the SAE files of ``target`` for those written in ``scratch`` (see `save`)."""
    with _locked(target):
        new = [entry.name for entry in scratch.iterdir()]
        # Checked again (the folder may have changed), and with any file that a new
        # one replaces, so that a failure puts back every file it moved.
        old = set(_replaced_files(target, overwrite=True))
        old.update(name for name in new if os.path.lexists(target / name))
        aside = scratch / _ASIDE
        os.mkdir(aside)
        moved_out, moved_in = [], []
        try:
            # A folder loads only with its config: the old one goes first and the new
            # one comes last, so the folder never pairs one model's config with
            # another's weights.
            for name in sorted(old, key=_is_config, reverse=True):
                os.rename(target / name, aside / name)
                moved_out.append(name)
            for name in sorted(new, key=_is_config):
                os.rename(scratch / name, target / name)
                moved_in.append(name)
        except BaseException as error:
            try:
                for name in reversed(moved_in):
                    os.rename(target / name, scratch / name)
                for name in reversed(moved_out):
                    os.rename(aside / name, target / name)
                os.rmdir(aside)
            except OSError as failure:
                raise OSError(
                    f"Saving to {target} failed ({error!r}) and the previous SAE's files "
                    f"could not be put back ({failure}): they are in {aside}."
                ) from error
            raise
        shutil.rmtree(aside)


def _is_config(name):
    return name in (_CONFIG_FILE, SAELENS_CONFIG)


@contextmanager
def _locked(folder):
    """Hold an exclusive lock on ``folder`` (``flock``; nothing where there is no fcntl)."""
    if fcntl is None:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock
