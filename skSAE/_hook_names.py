"""Hook names of other libraries to `ActivationExtractor`'s ``hook`` and ``layer``.

SAEs trained elsewhere name the activation they read in one of three spellings:
TransformerLens hook points (SAELens: ``blocks.6.hook_resid_post``), Hugging Face
module paths relative to the base model (sparsify: ``layers.6``, ``layers.6.mlp``) and
dictionary_learning's submodule names (``resid_post_layer_6``). A leaf module: no
torch, no transformers.
"""

import re

_TRANSFORMER_LENS = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")
_DICTIONARY_LEARNING = re.compile(r"^(resid_post|mlp_out|attn_out)_layer_(\d+)$")
# A block's path ends in one of these list names and its index; its children are
# the MLP and attention modules of `extraction` (GPT-2 ``h``, Llama ``layers``, ...).
# The names a block's attention and MLP children have across model families; the
# extractor's ``attn_out`` and ``mlp_out`` hooks look them up too.
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
_MODULE_PATH = re.compile(
    r"^(?:.*\.)?(?:layers|h|layer|blocks)\.(\d+)"
    rf"(?:\.({'|'.join(ATTENTION_NAMES + MLP_NAMES)}))?$"
)
_HOOKS = {"resid_post": "resid_post", "mlp_out": "mlp_out", "attn_out": "attn_out"}
_CHILD_HOOKS = {
    None: "resid_post",
    **{name: "mlp_out" for name in MLP_NAMES},
    **{name: "attn_out" for name in ATTENTION_NAMES},
}


def extractor_hook(name):
    """``(hook, layer)`` of `ActivationExtractor` for another library's hook name.

    Parameters
    ----------
    name : str
        ``blocks.L.hook_resid_post`` / ``hook_mlp_out`` / ``hook_attn_out`` /
        ``hook_resid_pre`` (TransformerLens), ``resid_post_layer_L`` (and ``mlp_out``,
        ``attn_out``; dictionary_learning), a block path (``layers.L``,
        ``model.layers.L``, ``transformer.h.L``) or its MLP or attention child; any
        other string is taken as a module path of the model (``layer`` then 0).

    Returns
    -------
    hook : str
    layer : int

    Raises
    ------
    ValueError
        For TransformerLens hooks that no module output carries (``hook_resid_mid``,
        ``hook_z``, ...) and ``blocks.0.hook_resid_pre`` (the embeddings).

    Examples
    --------
    >>> extractor_hook("blocks.6.hook_resid_post"), extractor_hook("blocks.6.hook_resid_pre")
    (('resid_post', 6), ('resid_post', 5))
    >>> extractor_hook("layers.3.mlp"), extractor_hook("attn_out_layer_2")
    (('mlp_out', 3), ('attn_out', 2))
    """
    match = _TRANSFORMER_LENS.match(name)
    if match:
        layer, kind = int(match.group(1)), match.group(2)
        if kind in _HOOKS:
            return _HOOKS[kind], layer
        if kind == "resid_pre" and layer > 0:
            return "resid_post", layer - 1  # the input of block L is block L-1's output
        raise ValueError(
            f"hook {name!r} is not the output of a module of a Hugging Face model "
            "(supported: blocks.L.hook_resid_post, hook_mlp_out, hook_attn_out and "
            "hook_resid_pre for L > 0); pass hook='<module path>' to the extractor."
        )
    match = _DICTIONARY_LEARNING.match(name)
    if match:
        return match.group(1), int(match.group(2))
    match = _MODULE_PATH.match(name)
    if match:
        return _CHILD_HOOKS[match.group(2)], int(match.group(1))
    return name, 0


def transformer_lens_name(hook, layer):
    """The TransformerLens spelling of an extractor's hook, or None for a module path.

    Examples
    --------
    >>> transformer_lens_name("resid_post", 6)
    'blocks.6.hook_resid_post'
    """
    if hook in _HOOKS:
        return f"blocks.{layer}.hook_{hook}"
    return None
