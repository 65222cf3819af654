"""Loss recovered: splice an SAE's reconstruction into the model and compare losses.

Public through `skSAE.metrics`.

Shape suffixes: B contexts, S sequence positions, D d_model, N tokens (flattened).
"""

from typing import NamedTuple

import torch
from sklearn.utils.validation import check_is_fitted

from ._estimator import check_input_width, inference_module


class LossRecovered(NamedTuple):
    """Loss recovered with the cross-entropies and KL divergences it comes from."""

    score: float
    """(ce_ablated - ce_sae) / (ce_ablated - ce_clean)."""
    ce_clean: float
    """Cross-entropy of the unmodified model (nats per predicted token)."""
    ce_sae: float
    """Cross-entropy with the SAE's reconstruction spliced in."""
    ce_ablated: float
    """Cross-entropy with the ablation spliced in."""
    kl_sae: float
    """Mean KL(clean || SAE-spliced) per predicted token."""
    kl_ablated: float
    """Mean KL(clean || ablated) per predicted token."""


def loss_recovered(sae, extractor, texts, ablation="zero"):
    """Fraction of the cross-entropy lost by ablating the hook that the SAE gives back.

    ``(CE_ablated - CE_sae) / (CE_ablated - CE_clean)``: 1 when splicing the SAE's
    reconstruction in leaves the model's loss unchanged, 0 when it is as bad as the
    ablation. See `loss_recovered_details` for the terms and the positions spliced.
    With ``extractor.memory`` set, the clean and ablated cross-entropies are cached, so
    scoring many SAEs on the same texts costs one forward pass each.

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted on activations of ``extractor``'s hook.
    extractor : ActivationExtractor
        The model and hook point; its position rules decide what is spliced.
    texts : list of str
        Held-out texts.
    ablation : {"zero", "mean"}, default="zero"
        The baseline: zeros, or the mean activation over the kept tokens of ``texts``.

    Returns
    -------
    score : float
    """
    _check_ablation(ablation)
    reconstruct = _reconstruction(sae, extractor)
    memory = extractor._memory()
    if memory is None:
        ce_clean, ce_ablated = _baseline_cross_entropies(extractor, None, texts, ablation)
    else:
        cached = memory.cache(_baseline_cross_entropies, ignore=["extractor"])
        ce_clean, ce_ablated = cached(extractor, extractor._cache_key(), list(texts), ablation)
    ce_sae = extractor.cross_entropy(texts, reconstruct)
    return (ce_ablated - ce_sae) / (ce_ablated - ce_clean)


def _check_ablation(ablation):
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}.")


def _ablation(extractor, texts, ablation):
    """The replacement function of an ablation baseline."""
    if ablation == "zero":
        return torch.zeros_like
    mean_D = torch.from_numpy(extractor.extract(texts).activations.mean(axis=0))

    def replace_by_mean(hidden_BSD):
        return mean_D.to(hidden_BSD.device, hidden_BSD.dtype).expand_as(hidden_BSD)

    return replace_by_mean


def _baseline_cross_entropies(extractor, key, texts, ablation):
    """(clean, ablated) cross-entropies; module-level so joblib can cache them."""
    losses = extractor.spliced_losses(texts, {"ablated": _ablation(extractor, texts, ablation)})
    return losses.clean, losses.spliced["ablated"]


def _reconstruction(sae, extractor):
    """A function mapping hooked activations to the SAE's reconstruction of them."""
    check_is_fitted(sae)
    model, _ = extractor.load()
    module = inference_module(sae, next(model.parameters()).device)

    def reconstruct(hidden_BSD):
        check_input_width(sae, hidden_BSD)
        x_ND = hidden_BSD.reshape(-1, hidden_BSD.shape[-1]).float()
        return module.decode(module.encode(x_ND)).reshape(hidden_BSD.shape)

    return reconstruct


def loss_recovered_details(sae, extractor, texts, ablation="zero"):
    """`loss_recovered` with the cross-entropies and KL divergences behind it.

    The SAE and the ablation replace the activation at the same positions: those
    ``extractor.extract`` keeps (by default every token but the first of each context
    and special tokens, whose activations the SAE never saw). Cross-entropy is averaged
    over every next-token prediction of every context.

    Parameters
    ----------
    sae, extractor, texts, ablation
        See `loss_recovered`.

    Returns
    -------
    details : LossRecovered
    """
    _check_ablation(ablation)
    replacements = {
        "sae": _reconstruction(sae, extractor),
        "ablated": _ablation(extractor, texts, ablation),
    }
    losses = extractor.spliced_losses(texts, replacements)
    ce_sae, ce_ablated = losses.spliced["sae"], losses.spliced["ablated"]
    return LossRecovered(
        score=(ce_ablated - ce_sae) / (ce_ablated - losses.clean),
        ce_clean=losses.clean,
        ce_sae=ce_sae,
        ce_ablated=ce_ablated,
        kl_sae=losses.kl["sae"],
        kl_ablated=losses.kl["ablated"],
    )
