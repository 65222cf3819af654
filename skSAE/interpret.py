"""Looking inside a fitted SAE: top-activating examples, a dashboard, and steering.

The public face of the interpretation tools. `top_activating_examples` (from
`skSAE._top_activations`) reads a corpus in one pass (then the texts holding an
example, for their windows) and reports, for each requested latent,
the tokens it fires most on (with their context), samples from lower activation
quantiles, its firing density and activation histogram, and the tokens its decoder
direction promotes and suppresses through the model's unembedding. `write_dashboard`
(from `skSAE.dashboard`) writes those reports as one HTML page.
`generate_with_steering`, defined here, generates text with a latent's decoder
direction added at the SAE's hook, or with latents ablated from the SAE's codes.

Shape suffixes::

    B minibatch rows   S sequence positions   D n_features (d_model, SAE input)
    N rows (tokens, flattened)   A ablated latents
"""

from numbers import Integral, Real

import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._estimator import check_input_width, inference_module
from ._sklearn_compat import HasMethods, Interval, validate_params
from ._top_activations import ActivatingExample, LatentReport, top_activating_examples
from ._validation import check_latents, invalid_parameter
from .dashboard import write_dashboard

__all__ = [
    "ActivatingExample",
    "LatentReport",
    "generate_with_steering",
    "top_activating_examples",
    "write_dashboard",
]


@validate_params(
    {
        "sae": [HasMethods(["transform", "inverse_transform"])],
        "extractor": [HasMethods(["load", "splice"])],
        "prompt": [str],
        "latent": [Integral, None],
        "scale": [Interval(Real, None, None, closed="neither")],
        "ablate": ["array-like", None],
        "max_new_tokens": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "do_sample": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def generate_with_steering(
    sae,
    extractor,
    prompt,
    latent=None,
    scale=0.0,
    *,
    ablate=None,
    max_new_tokens=30,
    random_state=0,
    do_sample=False,
):
    """Generate text with a latent's direction added, or latents ablated, at the hook.

    Steering adds ``scale * components_[latent]`` to the hooked activation at every
    position, the prompt's and each generated token's. Ablation sets the ``ablate``
    latents to zero in the SAE's codes while keeping the SAE's error term: the
    activation ``x`` becomes ``x - codes[ablate] @ components_[ablate]``, which is
    ``x + (x_hat_ablated - x_hat)``, so only those latents' contributions change. Both
    can be combined (ablation first, on the clean activation).

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted on activations of ``extractor``'s hook.
    extractor : ActivationExtractor
        A causal language model and the hook point.
    prompt : str
        Text the generation continues.
    latent : int, default=None
        Latent whose decoder direction is added; None for none.
    scale : float, default=0.0
        Multiple of the (unit) decoder direction added, in the units of the activations.
    ablate : sequence of int, default=None
        Latents removed from the SAE's codes.
    max_new_tokens : int, default=30
        Tokens generated after the prompt.
    random_state : int, RandomState instance or None, default=0
        Seeds the sampling when ``do_sample=True``; the global torch RNG is left as it was.
    do_sample : bool, default=False
        Sample from the model's distribution instead of greedy decoding.

    Returns
    -------
    text : str
        The prompt and its continuation, without special tokens.

    Raises
    ------
    ValueError
        When a latent is out of range, the prompt is not a string (or not valid
        Unicode: a lone surrogate), or the model has no language-model head.

    Notes
    -----
    With the key/value cache, each generation step runs the hook on the new token only;
    the intervention applies to whatever positions pass through it, so every position
    is steered exactly once.

    Examples
    --------
    >>> from skSAE.interpret import generate_with_steering
    >>> generate_with_steering(sae, extractor, "The cat", latent=5, scale=8.0)  # doctest: +SKIP
    """
    check_is_fitted(sae)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        # The tokenizers library would raise a bare TypeError on it.
        raise invalid_parameter(
            "prompt",
            "generate_with_steering",
            "valid Unicode, which no lone surrogate is (no tokenizer can encode one; "
            "decode the source with errors='replace' or drop the character)",
            f"a lone surrogate {prompt[exc.start]!r} at character {exc.start}",
        ) from None
    model, tokenizer = extractor.load()
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} has no language-model head, so it cannot generate; "
            "load the model with a causal LM head."
        )
    replacement = _steering_replacement(sae, extractor, latent, scale, ablate)
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids_BS = encoded["input_ids"].to(device)
    if input_ids_BS.shape[1] == 0:
        raise invalid_parameter(
            "prompt", "generate_with_steering", "a text that gives at least one token", repr(prompt)
        )
    attention_mask_BS = encoded["attention_mask"].to(device)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    seed = int(check_random_state(random_state).randint(2**31 - 1))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)  # inside fork_rng: the caller's RNG state is restored
        with extractor.splice(replacement):
            output_BS = model.generate(
                input_ids=input_ids_BS,
                attention_mask=attention_mask_BS,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=pad_id,
            )
    return tokenizer.decode(output_BS[0], skip_special_tokens=True)


def _steering_replacement(sae, extractor, latent, scale, ablate):
    """The splice function of `generate_with_steering` (tested on its own).

    ``scale`` is a finite number (checked by `generate_with_steering`); the latents are
    checked here, against the SAE's ``n_components``.
    """
    n_components = sae.components_.shape[0]
    caller = "generate_with_steering"
    if latent is not None:
        latent = check_latents(latent, n_components, "latent", caller)[0]
    ablated = (
        []
        if ablate is None
        else check_latents(ablate, n_components, "ablate", caller, allow_empty=True)
    )
    model, _ = extractor.load()
    device = next(model.parameters()).device
    module = inference_module(sae, device)
    direction_D = (
        torch.from_numpy(sae.components_[latent]).to(device) if latent is not None else None
    )
    ablated_A = torch.tensor(ablated, dtype=torch.long, device=device)
    W_ablated_AD = module.W_dec_FD.detach().index_select(0, ablated_A)

    def replace(hidden_BSD):
        check_input_width(sae, hidden_BSD)
        new_BSD = hidden_BSD.float()
        if ablated:
            x_ND = new_BSD.reshape(-1, new_BSD.shape[-1])
            codes_NA = module.encode(x_ND).index_select(1, ablated_A)
            new_BSD = new_BSD - (codes_NA @ W_ablated_AD).reshape(new_BSD.shape)
        if direction_D is not None and scale != 0:
            new_BSD = new_BSD + scale * direction_D
        return new_BSD

    return replace
