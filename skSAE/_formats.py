"""Other SAE libraries' files: read SAELens, sparsify, dictionary_learning; write SAELens.

Every reader returns an `ImportedSAE`: the architecture, the estimator parameters it
implies (``k``, ``prefix_sizes``), the *public form* of `SparseAutoencoder` in float64
(``codes = act(X @ W_enc_ + b_enc_)``, ``X_hat = codes @ components_ + b_dec_`` with
unit-norm ``components_`` rows) and the metadata of the file. Two foldings make the
public form compute exactly what the original library computes:

- an input bias (``x - b_dec`` before the encoder) moves into ``b_enc_``:
  ``(x - b) @ W + c = x @ W + (c - b @ W)``;
- decoder row norms ``n`` move into the encoder: ``W_enc_ = W_enc * n``,
  ``b_enc_ = b_enc * n``, ``threshold_ = threshold * n`` and ``components_ = W_dec / n``.
  Every activation here is positively homogeneous, so each code is the original's
  times its row's norm and every reconstruction is unchanged. TopK selects on the
  unscaled pre-activations, so a TopK file must have unit rows (or, in SAELens,
  ``rescale_acts_by_decoder_norm``, which selects on the scaled ones).

Shape suffixes: D input width (``d_in``), F latents (``d_sae``).
"""

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

# Decoder rows within this of one norm count as sharing it (float32 renormalisation
# leaves about 1e-7); bfloat16 and float16 storage leave up to about 4e-4 at widths
# 768-4096.
UNIT_NORM_TOLERANCE = 1e-5
HALF_PRECISION_NORM_TOLERANCE = 2e-3
# SAELens's sparsity file holds log10(firing fraction + this).
SPARSITY_EPSILON = 1e-10
# The SAELens version whose layout `write_saelens` writes; SAELens reads a file without
# a version as pre-6.0 and converts it.
SAELENS_FORMAT_VERSION = "6.0.0"


class FormatError(ValueError):
    """A file or folder that is not what its format says: names the file and the field."""


class ImportedSAE(NamedTuple):
    """An SAE read from another library's files, in skSAE's public form (float64)."""

    architecture: str
    """`SparseAutoencoder.architecture`."""
    params: dict
    """Further estimator parameters (``k``, ``prefix_sizes``)."""
    state: dict
    """``W_enc_``, ``b_enc_``, ``components_``, ``b_dec_``, optionally ``threshold_``
    and ``latent_frequency_``."""
    metadata: dict
    """What the file says about the model and hook it was trained on."""


# ------------------------------------------------------------------- file access


def read_json_object(path):
    """The JSON object in ``path``; `FormatError` if it is missing, invalid or not an object."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} is missing.")
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON: {exc}.") from exc
    except RecursionError:
        # The decoder recurses once per level: thousands of nested brackets exhaust it.
        raise FormatError(
            f"{path} nests its JSON values too deeply to read (no SAE config does)."
        ) from None
    if not isinstance(value, dict):
        raise FormatError(f"{path} must hold a JSON object, got a {type(value).__name__}.")
    return value


def read_safetensors(path):
    """The tensors of a safetensors file as float64 NumPy arrays (bfloat16 included)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} is missing.")
    try:
        tensors = load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{path} is not a readable safetensors file ({exc}).") from exc
    return _TensorFile(tensors, path)


def write_safetensors(arrays, path):
    """Write ``arrays`` to ``path`` (safetensors) and flush it to the disk.

    A failed write raises the `OSError` it is (a full disk: ``errno.ENOSPC``), where
    safetensors reports it as a ``SafetensorError`` with the OS error in its text.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file(arrays, os.fspath(path))
    except SafetensorError as exc:
        number = re.search(r"\(os error (\d+)\)", str(exc))
        if number is None:
            raise
        raise OSError(int(number.group(1)), f"{path} could not be written ({exc})") from exc
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def write_json(value, path, default=None):
    """Write ``value`` to ``path`` as indented JSON and flush it to the disk."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, default=default)
        file.flush()
        os.fsync(file.fileno())


def read_torch_state(path):
    """A torch state dict (``torch.load(weights_only=True)``: no code runs) as NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} is missing.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise FormatError(
            f"{path} is not a readable torch state dict ({type(exc).__name__}: {first_line})."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{path} must hold a dict of tensors (a state dict).")
    return _TensorFile(state, path)


class _TensorFile(dict):
    """A file's tensors as float64 arrays, with their stored dtypes in ``dtypes``."""

    def __init__(self, tensors, path):
        super().__init__({name: _to_float64(name, value, path) for name, value in tensors.items()})
        self.dtypes = {name: value.dtype for name, value in tensors.items()}


def norm_tolerance_for(tensors, name):
    """How far decoder-row norms may spread from storage rounding alone."""
    dtype = getattr(tensors, "dtypes", {}).get(name)
    half = dtype in (torch.bfloat16, torch.float16)
    return HALF_PRECISION_NORM_TOLERANCE if half else UNIT_NORM_TOLERANCE


def _to_float64(name, tensor, path):
    if tensor.is_complex():
        raise FormatError(f"{path}: tensor {name!r} is complex.")
    return tensor.detach().to(torch.float64).numpy()


def tensor(tensors, name, shape, path):
    """``tensors[name]``, checked to have ``shape``; `FormatError` naming the file if not."""
    if name not in tensors:
        raise FormatError(f"{path} has no tensor {name!r} (it has {sorted(tensors)}).")
    value = tensors[name]
    if tuple(value.shape) != tuple(shape):
        raise FormatError(
            f"{path}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}."
        )
    if not np.isfinite(value).all():
        raise FormatError(f"{path}: tensor {name!r} holds NaN or infinite values.")
    return value


def field(config, name, path, kinds):
    """``config[name]``, checked to be an instance of ``kinds``."""
    if name not in config:
        raise FormatError(f"{path} has no field {name!r}.")
    value = config[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise FormatError(f"{path}: field {name!r} is {value!r}, expected {_kind_names(kinds)}.")
    return value


def _kind_names(kinds):
    return " or ".join(kind.__name__ for kind in kinds)


# ----------------------------------------------------------------- the folding


def public_form(
    W_enc_DF,
    b_enc_F,
    W_dec_FD,
    b_dec_D,
    *,
    input_bias_D=None,
    threshold=None,
    topk_on_unscaled=False,
    norm_tolerance=UNIT_NORM_TOLERANCE,
    path="",
):
    """skSAE's public form (float64) of ``act((x - input_bias) @ W_enc + b_enc)``.

    Parameters
    ----------
    W_enc_DF, b_enc_F, W_dec_FD, b_dec_D : ndarray
        The original weights; decoding is ``codes @ W_dec_FD + b_dec_D``.
    input_bias_D : ndarray, default=None
        Subtracted from the input before the encoder (``apply_b_dec_to_input``).
    threshold : ndarray of shape () or (F,), default=None
        Codes are kept where the pre-activation exceeds it, after a ReLU (every
        library here applies one, so a negative threshold acts as 0).
    topk_on_unscaled : bool, default=False
        A TopK that selects on the pre-activations as given: the decoder rows must
        share one norm, as the selection would change otherwise.
    norm_tolerance : float
        Relative spread of the row norms that still counts as one norm (storage
        rounding: `norm_tolerance_for`).
    path : str
        The file, for error messages.

    Returns
    -------
    state : dict
        ``W_enc_``, ``b_enc_``, ``components_``, ``b_dec_`` and, with a threshold,
        ``threshold_`` (per latent, unless the rows were unit-norm already).
    """
    b_enc_F = np.array(b_enc_F, dtype=np.float64)
    if input_bias_D is not None:
        b_enc_F = b_enc_F - input_bias_D @ W_enc_DF
    norm_F = np.linalg.norm(W_dec_FD, axis=1)
    alive_F = norm_F > 0
    common = float(np.median(norm_F[alive_F])) if alive_F.any() else 1.0
    shared = np.abs(norm_F[alive_F] / common - 1).max(initial=0) <= norm_tolerance
    if topk_on_unscaled and not shared:
        spread = float(np.abs(norm_F[alive_F] / common - 1).max())
        raise FormatError(
            f"{path}: a TopK SAE whose decoder rows differ in norm (by up to {spread:.3g} "
            f"relative to {common:.6g}) selects its top k latents on unscaled "
            "pre-activations, which skSAE's unit-norm components_ cannot reproduce. "
            "Renormalise its decoder in the library that trained it, then load it."
        )
    if shared:
        # One norm for every row (up to storage rounding): folding that one scale keeps
        # every code's order (TopK too), and unit rows stay as they are, so that a file
        # skSAE wrote reads back bit for bit.
        scale = 1.0 if abs(common - 1) <= norm_tolerance else common
        norm_F = np.full_like(norm_F, scale)
    else:
        # A zero row (a latent that never learned) stays zero; it decodes to nothing.
        norm_F = np.where(alive_F, norm_F, 1.0)
    state = {
        "W_enc_": W_enc_DF * norm_F,
        "b_enc_": b_enc_F * norm_F,
        "components_": W_dec_FD / norm_F[:, None],
        "b_dec_": np.array(b_dec_D, dtype=np.float64),
    }
    if threshold is not None:
        threshold = np.maximum(np.asarray(threshold, dtype=np.float64), 0.0)
        state["threshold_"] = threshold * (norm_F[0] if shared else norm_F)
    return state


def _shared_threshold(state, architecture):
    """BatchTopK and Matryoshka need one threshold; per-latent ones make a JumpReLU."""
    threshold = state.get("threshold_")
    if architecture in ("batchtopk", "matryoshka") and threshold is not None and threshold.ndim:
        return "jumprelu"
    return architecture


# ------------------------------------------------------------------------ SAELens

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"
SAELENS_SPARSITY = "sparsity.safetensors"
# The keys SAELens renames when it reads a file written before 6.0.
_SAELENS_RENAMES = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}
_SAELENS_ARCHITECTURES = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
}


def read_saelens(folder, norm_scaling_factor=None):
    """An SAE saved by SAELens 6 (``SAE.save_model``), or a pre-6.0 file it converts.

    ``normalize_activations="expected_average_only_in"`` (inputs multiplied by a
    dataset constant the file does not hold) is folded when ``norm_scaling_factor``
    gives that constant; per-token normalisations cannot be folded and are refused.
    """
    folder = Path(folder)
    config_path, weights_path = folder / SAELENS_CONFIG, folder / SAELENS_WEIGHTS
    config = read_json_object(config_path)
    if not isinstance(config.get("metadata", {}), (dict, type(None))):
        raise FormatError(f"{config_path}: field 'metadata' must be an object.")
    metadata = dict(config.get("metadata") or {})
    version = config.get("sae_lens_version") or metadata.get("sae_lens_version")
    if _major_version(version) < 6:  # as SAELens converts a file written before 6.0
        config = {_SAELENS_RENAMES.get(key, key): value for key, value in config.items()}
        for name in ("hook_name", "model_name", "context_size", "prepend_bos"):
            if name in config:
                metadata.setdefault(name, config[name])
        kwargs = config.get("activation_fn_kwargs") or {}
        if config.get("activation_fn") == "topk" and isinstance(kwargs, dict) and "k" in kwargs:
            config = {**config, "architecture": "topk", "k": kwargs["k"]}
        config.setdefault("architecture", "standard")
        hook_name = str(metadata.get("hook_name", ""))
        config.setdefault("reshape_activations", "hook_z" if "hook_z" in hook_name else "none")
    name = config.get("architecture")
    if name is None:
        raise FormatError(f"{config_path} has no field 'architecture'.")
    if not isinstance(name, str) or name not in _SAELENS_ARCHITECTURES:
        raise FormatError(
            f"{config_path}: architecture {name!r} is not one skSAE models (it reads "
            f"{sorted(_SAELENS_ARCHITECTURES)})."
        )
    reshaped = config.get("reshape_activations", "none") != "none"
    if reshaped or config.get("hook_head_index") is not None:
        raise FormatError(
            f"{config_path}: SAEs on reshaped attention activations (hook_z, head indices) "
            "are not supported."
        )
    d_in = field(config, "d_in", config_path, int)
    d_sae = field(config, "d_sae", config_path, int)
    tensors = read_safetensors(weights_path)
    W_enc = tensor(tensors, "W_enc", (d_in, d_sae), weights_path)
    W_dec = tensor(tensors, "W_dec", (d_sae, d_in), weights_path)
    b_dec = tensor(tensors, "b_dec", (d_in,), weights_path)
    # Early files wrote a boolean: true meant the expected-average scaling.
    normalisation = config.get("normalize_activations", "none")
    normalisation = {False: "none", True: "expected_average_only_in"}.get(
        normalisation, normalisation
    )
    if normalisation == "expected_average_only_in":
        if norm_scaling_factor is None:
            raise FormatError(
                f"{config_path}: normalize_activations='expected_average_only_in' multiplies "
                "the inputs by a dataset constant that the files do not hold; pass it as "
                "norm_scaling_factor= (SAELens's pretrained directory lists it)."
            )
        # The SAE saw x * s: fold s as SAELens's fold_activation_norm_scaling_factor does.
        scale = float(norm_scaling_factor)
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"norm_scaling_factor must be a positive number, got {scale!r}.")
        W_enc, W_dec, b_dec = W_enc * scale, W_dec / scale, b_dec / scale
    elif normalisation not in ("none", None):
        raise FormatError(
            f"{config_path}: normalize_activations={normalisation!r} rescales each input "
            "by its own statistics, which no fixed weights reproduce; only 'none' and "
            "'expected_average_only_in' (with norm_scaling_factor) can be loaded."
        )
    apply_b_dec = config.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise FormatError(f"{config_path}: field 'apply_b_dec_to_input' must be true or false.")
    input_bias = b_dec if apply_b_dec else None
    architecture = _SAELENS_ARCHITECTURES[name]
    params = {}
    if name == "gated":
        b_gate = tensor(tensors, "b_gate", (d_sae,), weights_path)
        b_mag = tensor(tensors, "b_mag", (d_sae,), weights_path)
        scale = np.exp(tensor(tensors, "r_mag", (d_sae,), weights_path))
        # gate > 0  <=>  magnitude pre-activation > b_mag - exp(r_mag) * b_gate.
        state = public_form(
            W_enc * scale,
            b_mag,
            W_dec,
            b_dec,
            input_bias_D=input_bias,
            threshold=b_mag - scale * b_gate,
            norm_tolerance=norm_tolerance_for(tensors, "W_dec"),
            path=weights_path,
        )
    else:
        b_enc = tensor(tensors, "b_enc", (d_sae,), weights_path)
        threshold = None
        if name == "jumprelu":
            if "threshold" not in tensors and "log_threshold" in tensors:
                tensors["threshold"] = np.exp(tensors["log_threshold"])
            threshold = tensor(tensors, "threshold", (d_sae,), weights_path)
        rescaled = bool(config.get("rescale_acts_by_decoder_norm", False))
        state = public_form(
            W_enc,
            b_enc,
            W_dec,
            b_dec,
            input_bias_D=input_bias,
            threshold=threshold,
            topk_on_unscaled=name == "topk" and not rescaled,
            norm_tolerance=norm_tolerance_for(tensors, "W_dec"),
            path=weights_path,
        )
        if name == "topk":
            params["k"] = field(config, "k", config_path, int)
    sparsity_path = folder / SAELENS_SPARSITY
    if sparsity_path.exists():
        log_sparsity = tensor(read_safetensors(sparsity_path), "sparsity", (d_sae,), sparsity_path)
        state["latent_frequency_"] = np.clip(10.0**log_sparsity - SPARSITY_EPSILON, 0.0, 1.0)
    metadata["format"] = "saelens"
    return ImportedSAE(architecture, params, state, metadata)


def _major_version(version):
    """The major number of a version string (``"6.0.0rc1"`` -> 6); 0 when absent or odd."""
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def write_saelens(folder, state, architecture, *, k=None, metadata=None):
    """Write a public form (float32) as SAELens 6's inference layout into ``folder``.

    ``relu`` is written as ``standard``, ``topk`` as ``topk``, ``gated`` as ``gated``
    (``r_mag = 0``, ``b_mag = b_enc_``, ``b_gate = b_enc_ - threshold_``), and
    ``jumprelu``, ``batchtopk`` and ``matryoshka`` as ``jumprelu`` (a shared threshold
    broadcast to every latent). The encoder bias already holds the input bias, so
    ``apply_b_dec_to_input`` is false.
    """
    folder = Path(folder)
    d_in, d_sae = state["W_enc_"].shape
    tensors = {"W_enc": state["W_enc_"], "W_dec": state["components_"], "b_dec": state["b_dec_"]}
    if architecture == "gated":
        name = "gated"
        tensors["b_mag"] = state["b_enc_"]
        tensors["b_gate"] = state["b_enc_"] - state["threshold_"]
        tensors["r_mag"] = np.zeros(d_sae, np.float32)
    else:
        tensors["b_enc"] = state["b_enc_"]
        name = {"relu": "standard", "topk": "topk"}.get(architecture, "jumprelu")
        if name == "jumprelu":
            tensors["threshold"] = np.broadcast_to(state["threshold_"], (d_sae,))
    tensors = {key: np.array(value, dtype=np.float32, order="C") for key, value in tensors.items()}
    config = {
        "architecture": name,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, **(metadata or {})},
    }
    if name == "topk":
        config["k"] = int(k)
        config["rescale_acts_by_decoder_norm"] = False
    write_safetensors(tensors, folder / SAELENS_WEIGHTS)
    if "latent_frequency_" in state:
        frequency_F = np.asarray(state["latent_frequency_"], dtype=np.float64)
        sparsity = np.log10(frequency_F + SPARSITY_EPSILON).astype(np.float32)
        write_safetensors({"sparsity": sparsity}, folder / SAELENS_SPARSITY)
    write_json(config, folder / SAELENS_CONFIG)


# ------------------------------------------------------------------------ sparsify

SPARSIFY_WEIGHTS = "sae.safetensors"
SPARSIFY_CONFIG = "cfg.json"


def read_sparsify(folder):
    """A TopK SAE saved by EleutherAI's sparsify (``SparseCoder.save_to_disk``).

    Its encoder is ``topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias))`` and its
    decoder ``codes @ W_dec + b_dec``, with ``W_dec`` of shape (F, D).
    """
    folder = Path(folder)
    config_path, weights_path = folder / SPARSIFY_CONFIG, folder / SPARSIFY_WEIGHTS
    config = read_json_object(config_path)
    for flag, why in (
        ("transcode", "a transcoder (it predicts another activation)"),
        ("skip_connection", "a skip connection (W_skip)"),
        ("matching_pursuit", "a matching-pursuit encoder"),
        ("signed", "a signed TopK (it keeps negative codes)"),
        ("embed_skip", "an embedding skip connection"),
        ("gram_lookup", "a Gram-matrix lookup encoder"),
        ("slice_encoder", "a sliced encoder"),
        ("slice_decoder", "a sliced decoder"),
    ):
        if config.get(flag):
            raise FormatError(f"{config_path}: {flag}=true: {why} is not an SAE skSAE models.")
    activation = config.get("activation", "topk")
    if activation != "topk":
        raise FormatError(
            f"{config_path}: activation {activation!r} is not one skSAE models (it reads 'topk')."
        )
    d_in = field(config, "d_in", config_path, int)
    k = field(config, "k", config_path, int)
    n_latents = config.get("num_latents") or d_in * field(
        config, "expansion_factor", config_path, int
    )
    tensors = read_safetensors(weights_path)
    if "W_skip" in tensors:
        raise FormatError(
            f"{weights_path} holds W_skip: an SAE with a skip connection is not one skSAE models."
        )
    encoder = tensor(tensors, "encoder.weight", (n_latents, d_in), weights_path)
    bias = tensor(tensors, "encoder.bias", (n_latents,), weights_path)
    W_dec = tensor(tensors, "W_dec", (n_latents, d_in), weights_path)
    b_dec = tensor(tensors, "b_dec", (d_in,), weights_path)
    state = public_form(
        encoder.T,
        bias,
        W_dec,
        b_dec,
        input_bias_D=b_dec,
        topk_on_unscaled=True,
        norm_tolerance=norm_tolerance_for(tensors, "W_dec"),
        path=weights_path,
    )
    # sparsify names a folder after its hook point (``layers.6``, ``layers.6.mlp``).
    metadata = {"format": "sparsify", "hook_name": folder.name}
    return ImportedSAE("topk", {"k": k}, state, metadata)


# -------------------------------------------------------------- dictionary_learning

DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
DICTIONARY_LEARNING_CONFIG = "config.json"


def read_dictionary_learning(folder):
    """An SAE saved by dictionary_learning (``ae.pt`` + ``config.json``).

    Reads ``AutoEncoder``, ``JumpReluAutoEncoder``, ``AutoEncoderTopK``,
    ``BatchTopKSAE``, ``MatryoshkaBatchTopKSAE`` and ``GatedAutoEncoder``; ``nn.Linear``
    weights are stored transposed, (out, in).
    """
    folder = Path(folder)
    config_path = folder / DICTIONARY_LEARNING_CONFIG
    weights_path = folder / DICTIONARY_LEARNING_WEIGHTS
    config = read_json_object(config_path)
    trainer = config.get("trainer")
    if not isinstance(trainer, dict):
        raise FormatError(f"{config_path} has no object field 'trainer'.")
    dict_class = field(trainer, "dict_class", config_path, str)
    d = field(trainer, "activation_dim", config_path, int)
    f = field(trainer, "dict_size", config_path, int)
    state_dict = read_torch_state(weights_path)

    def get(name, shape):
        return tensor(state_dict, name, shape, weights_path)

    tolerance = norm_tolerance_for(
        state_dict, "W_dec" if "W_dec" in state_dict else "decoder.weight"
    )

    params = {}
    if dict_class == "AutoEncoder":
        bias = get("bias", (d,))
        architecture = "relu"
        state = public_form(
            get("encoder.weight", (f, d)).T,
            get("encoder.bias", (f,)),
            get("decoder.weight", (d, f)).T,
            bias,
            input_bias_D=bias,
            norm_tolerance=tolerance,
            path=weights_path,
        )
    elif dict_class == "JumpReluAutoEncoder":
        architecture = "jumprelu"
        state = public_form(
            get("W_enc", (d, f)),
            get("b_enc", (f,)),
            get("W_dec", (f, d)),
            get("b_dec", (d,)),
            threshold=get("threshold", (f,)),
            norm_tolerance=tolerance,
            path=weights_path,
        )
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        b_dec = get("b_dec", (d,))
        architecture = "topk" if dict_class == "AutoEncoderTopK" else "batchtopk"
        params["k"] = _dictionary_learning_k(state_dict, trainer, weights_path, config_path)
        state = public_form(
            get("encoder.weight", (f, d)).T,
            get("encoder.bias", (f,)),
            get("decoder.weight", (d, f)).T,
            b_dec,
            input_bias_D=b_dec,
            threshold=None if architecture == "topk" else get("threshold", ()),
            topk_on_unscaled=architecture == "topk",
            norm_tolerance=tolerance,
            path=weights_path,
        )
    elif dict_class == "MatryoshkaBatchTopKSAE":
        b_dec = get("b_dec", (d,))
        architecture = "matryoshka"
        params["k"] = _dictionary_learning_k(state_dict, trainer, weights_path, config_path)
        group_sizes = state_dict.get("group_sizes")
        if (
            group_sizes is None
            or group_sizes.ndim != 1
            or not _positive_integers(group_sizes)
            or group_sizes.sum() != f
        ):
            raise FormatError(
                f"{weights_path}: tensor 'group_sizes' is "
                f"{None if group_sizes is None else group_sizes.tolist()}, expected positive "
                f"integer group sizes summing to dict_size={f}."
            )
        params["prefix_sizes"] = [int(size) for size in np.cumsum(group_sizes.astype(np.int64))]
        state = public_form(
            get("W_enc", (d, f)),
            get("b_enc", (f,)),
            get("W_dec", (f, d)),
            b_dec,
            input_bias_D=b_dec,
            threshold=get("threshold", ()),
            norm_tolerance=tolerance,
            path=weights_path,
        )
    elif dict_class == "GatedAutoEncoder":
        architecture = "gated"
        decoder_bias = get("decoder_bias", (d,))
        b_mag, b_gate = get("mag_bias", (f,)), get("gate_bias", (f,))
        scale = np.exp(get("r_mag", (f,)))
        state = public_form(
            get("encoder.weight", (f, d)).T * scale,
            b_mag,
            get("decoder.weight", (d, f)).T,
            decoder_bias,
            input_bias_D=decoder_bias,
            threshold=b_mag - scale * b_gate,
            norm_tolerance=tolerance,
            path=weights_path,
        )
    else:
        raise FormatError(
            f"{config_path}: dict_class {dict_class!r} is not one skSAE reads (AutoEncoder, "
            "JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, "
            "GatedAutoEncoder)."
        )
    architecture = _shared_threshold(state, architecture)
    if architecture == "jumprelu":
        params.pop("k", None)
        params.pop("prefix_sizes", None)
    metadata = {"format": "dictionary_learning"}
    for source, target in (
        ("lm_name", "model_name"),
        ("submodule_name", "hook_name"),
        ("layer", "layer"),
    ):
        if source in trainer:
            metadata[target] = trainer[source]
    if "buffer" in config and isinstance(config["buffer"], dict) and "ctx_len" in config["buffer"]:
        metadata["context_size"] = config["buffer"]["ctx_len"]
    return ImportedSAE(architecture, params, state, metadata)


def _dictionary_learning_k(state_dict, trainer, weights_path, config_path):
    """``k`` from the state dict's buffer, else from the trainer config (as the library)."""
    if "k" not in state_dict:
        k = field(trainer, "k", config_path, int)
        if k < 1:
            raise FormatError(f"{config_path}: field 'k' is {k}, expected a positive integer.")
        return k
    k = tensor(state_dict, "k", (), weights_path)
    if not _positive_integers(k):  # never truncate: a k of 2.9 is not a k of 2
        raise FormatError(
            f"{weights_path}: tensor 'k' is {k.item():g}, expected a positive integer."
        )
    return int(k)


def _positive_integers(values):
    """Whether every value (float64, as read) is a whole number of at least 1."""
    return bool(np.all((values >= 1) & (values == np.round(values))))
