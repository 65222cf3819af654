"""Loss recovered: splice an SAE's reconstruction into the model and compare losses.

Public through `skSAE.metrics`.

Shape suffixes: B contexts, S sequence positions, D d_model, N tokens (flattened).
"""

from typing import NamedTuple

import torch
from sklearn.utils.validation import check_is_fitted

from ._estimator import SparseAutoencoder, check_input_width, inference_module
from ._sklearn_compat import StrOptions, validate_params
from .extraction import ActivationExtractor

_CONSTRAINTS = {
    "sae": [SparseAutoencoder],
    "extractor": [ActivationExtractor],
    "texts": ["array-like"],
    "ablation": [StrOptions({"zero", "mean"})],
}


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


@validate_params(_CONSTRAINTS, prefer_skip_nested_validation=True)
def loss_recovered(sae, extractor, texts, ablation="zero"):
    """Fraction of the cross-entropy lost by ablating the hook that the SAE gives back.

    ``(CE_ablated - CE_sae) / (CE_ablated - CE_clean)``: 1 when splicing the SAE's
    reconstruction in leaves the model's loss unchanged, 0 when it is as bad as the
    ablation. See `loss_recovered_details` for the terms and the positions spliced.
    The clean and ablated cross-entropies come from
    `ActivationExtractor.baseline_cross_entropies`; with ``extractor.memory`` set they
    are cached, so scoring another SAE on the same texts costs one (spliced) forward
    pass per batch of contexts instead of three.

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

    Raises
    ------
    ValueError
        When the ablation leaves the cross-entropy exactly unchanged, so the ratio is
        0/0: no token of ``texts`` was spliced, or none that a next-token prediction
        depends on (a text of two tokens splices only its last).

    Notes
    -----
    The splice is ``sae.inverse_transform(sae.transform(activations))``, so it follows
    the SAE's `transform_algorithm`: with ``"omp"`` (or another dictionary solver) it
    measures the solver's codes on the learned dictionary, computed on the CPU one
    batch of contexts at a time, not the encoder's.
    """
    reconstruct = _reconstruction(sae, extractor)
    baselines = extractor.baseline_cross_entropies(texts, ablation)
    ce_sae = extractor.cross_entropy(texts, reconstruct)
    return _score(baselines.clean, ce_sae, baselines.ablated, extractor, texts, ablation)


def _score(ce_clean, ce_sae, ce_ablated, extractor, texts, ablation):
    """``(CE_ablated - CE_sae) / (CE_ablated - CE_clean)``, or a ValueError saying why
    the ablation left the loss exactly unchanged (the ratio is then 0/0)."""
    if ce_ablated != ce_clean:
        return (ce_ablated - ce_sae) / (ce_ablated - ce_clean)
    # Only here, so the count costs one more forward pass on this failure path alone.
    n_spliced = sum(part.activations.shape[0] for part in extractor.iter_batches(texts))
    if n_spliced == 0:
        reason = (
            "no token was spliced: the first position of each context and special tokens "
            "are never spliced"
        )
        if extractor.max_norm_ratio is not None:
            reason += f", nor tokens above max_norm_ratio={extractor.max_norm_ratio}"
    else:
        reason = (
            f"{n_spliced} token(s) were spliced, and none changes a next-token prediction: "
            "a splice changes only the predictions after it in its context, and a text of "
            "two tokens splices only its last"
        )
        if ablation == "mean":
            reason += " (or the mean ablation equals every spliced activation)"
    raise ValueError(
        f"loss recovered is undefined on these texts ({len(texts)} given): the ablation "
        f"leaves their cross-entropy unchanged ({ce_clean:.6g} nats), so the ratio is 0/0; "
        f"{reason}. Pass longer texts: a splice changes the loss only at a token that is "
        "neither special nor the first of its context, and that another token follows."
    )


def _reconstruction(sae, extractor):
    """A function mapping hooked activations to the SAE's reconstruction of them.

    The reconstruction is ``sae.inverse_transform(sae.transform(x))``: with the default
    ``transform_algorithm="encoder"`` computed by the SAE's torch module on the model's
    device; with a dictionary solver (``"omp"``, ...) by `transform` itself, on the
    CPU, one call per batch of contexts (so a ``None`` `transform_n_nonzero_coefs` or
    `transform_alpha` is resolved on each batch's activations).
    """
    check_is_fitted(sae)
    model, _ = extractor.load()
    if sae.transform_algorithm != "encoder":

        def reconstruct_with_solver(hidden_BSD):
            check_input_width(sae, hidden_BSD)
            x_ND = hidden_BSD.reshape(-1, hidden_BSD.shape[-1]).detach().float().cpu().numpy()
            x_hat_ND = torch.from_numpy(sae.inverse_transform(sae.transform(x_ND)))
            return x_hat_ND.to(hidden_BSD.device).reshape(hidden_BSD.shape)

        return reconstruct_with_solver
    module = inference_module(sae, next(model.parameters()).device)

    def reconstruct(hidden_BSD):
        check_input_width(sae, hidden_BSD)
        x_ND = hidden_BSD.reshape(-1, hidden_BSD.shape[-1]).float()
        return module.decode(module.encode(x_ND)).reshape(hidden_BSD.shape)

    return reconstruct


@validate_params(_CONSTRAINTS, prefer_skip_nested_validation=True)
def loss_recovered_details(sae, extractor, texts, ablation="zero"):
    """`loss_recovered` with the cross-entropies and KL divergences behind it.

    The SAE and the ablation replace the activation at the same positions: those
    ``extractor.extract`` keeps (by default every token but the first of each context
    and special tokens, whose activations the SAE never saw). Cross-entropy is averaged
    over every next-token prediction of every context. Nothing is cached: one pass
    computes all three cross-entropies and both KL divergences.

    Parameters
    ----------
    sae, extractor, texts, ablation
        See `loss_recovered`.

    Returns
    -------
    details : LossRecovered

    Raises
    ------
    ValueError
        As in `loss_recovered`.
    """
    replacements = {
        "sae": _reconstruction(sae, extractor),
        "ablated": extractor.ablation_replacement(texts, ablation),
    }
    losses = extractor.spliced_losses(texts, replacements)
    ce_sae, ce_ablated = losses.spliced["sae"], losses.spliced["ablated"]
    return LossRecovered(
        score=_score(losses.clean, ce_sae, ce_ablated, extractor, texts, ablation),
        ce_clean=losses.clean,
        ce_sae=ce_sae,
        ce_ablated=ce_ablated,
        kl_sae=losses.kl["sae"],
        kl_ablated=losses.kl["ablated"],
    )
