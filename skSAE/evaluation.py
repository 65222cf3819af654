"""Evaluation beyond L0 and loss recovered: SAEBench-style metrics, offline.

The public face of the evaluation modules: reconstruction diagnostics in one
streaming pass (`skSAE._diagnostics`), sparse probing, ablation effects and TPP on
labelled texts (`skSAE._probing`), feature absorption on the first-letter task
(`skSAE._absorption`), and `evaluate`, which runs every metric its inputs allow and
returns one flat dict (a row of a table: ``pandas.DataFrame(reports)``).
"""

import sys
import time

import numpy as np
from tqdm.auto import tqdm

from ._absorption import FewLettersWarning, FirstLetterAbsorption, first_letter_absorption
from ._amortisation import amortisation_gap
from ._diagnostics import (
    DiagnosticsAccumulator,
    encoder_decoder_cosine,
    max_decoder_cosine,
    reconstruction_diagnostics,
)
from ._loss_recovered import loss_recovered_details
from ._probing import (
    DEFAULT_K,
    ablation_effect,
    pooled_activations,
    pooled_probe_scores,
    probe_scores,
    sparse_probing,
    targeted_probe_perturbation,
    top_latents,
)
from .plotting import plot_evaluation

__all__ = [
    "DiagnosticsAccumulator",
    "FewLettersWarning",
    "FirstLetterAbsorption",
    "ablation_effect",
    "amortisation_gap",
    "encoder_decoder_cosine",
    "evaluate",
    "first_letter_absorption",
    "max_decoder_cosine",
    "plot_evaluation",
    "pooled_activations",
    "probe_scores",
    "reconstruction_diagnostics",
    "sparse_probing",
    "targeted_probe_perturbation",
    "top_latents",
]


AMORTISATION_ROWS = 2048
"""Held-out rows `evaluate` codes with OMP for the amortisation gap (the first ones)."""


def evaluate(sae, extractor, texts, labelled=None, *, absorption=False, amortisation=False,
             ablation="zero", k_values=DEFAULT_K, random_state=0, verbose=0):  # fmt: skip
    """Every evaluation the inputs allow, as one flat dict of numbers.

    - On ``texts`` (held-out), one streaming pass for `reconstruction_diagnostics`
      (the activations are never held whole), then one spliced pass for loss
      recovered with its cross-entropies and KL divergence.
    - With ``labelled = (texts, labels)``, one more pass pools their codes and
      activations, for `sparse_probing` and `targeted_probe_perturbation`.
    - With ``absorption=True``, `first_letter_absorption` on the words of the
      extractor's vocabulary (a few minutes on a CPU for a 135M model).
    - With ``amortisation=True``, `amortisation_gap` (the encoder against OMP on the
      SAE's dictionary at the encoder's L0) on the first 2048 held-out rows.

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted on ``extractor``'s activations.
    extractor : ActivationExtractor
        The model and hook.
    texts : list of str
        Held-out texts.
    labelled : tuple of (list of str, array-like), default=None
        Texts and one label per text (e.g. `skSAE.corpora.labelled_texts`).
    absorption : bool or dict, default=False
        Add the first-letter absorption scores (``mean_absorption_fraction_score``,
        ``mean_full_absorption_score``, ``mean_num_split_features``, ...); a dict is
        passed to `first_letter_absorption` (e.g. ``{"max_words": 300}``).
    amortisation : bool, default=False
        Add ``omp_explained_variance``, ``omp_mean_l0`` and ``amortisation_gap`` (OMP's
        explained variance minus the encoder's, on the same rows).
    ablation : {"zero", "mean"}, default="zero"
        The baseline of loss recovered.
    k_values : sequence of int, default=(1, 2, 5, 10, 20)
        Sizes of the sparse probes.
    random_state : int, default=0
        The train/test split of the labelled texts.
    verbose : int or bool, default=0
        A progress bar (stdout) over the stages, named as each starts; the extractor's
        own ``verbose`` shows its passes.

    Returns
    -------
    report : dict
        The scalars of `reconstruction_diagnostics` (``silent_fraction``: the latents
        never active on ``texts``, not the training ``dead_fraction_``); ``loss_recovered``,
        ``kl_divergence`` (mean KL(clean || spliced) per token), ``ce_clean``,
        ``ce_sae``, ``ce_ablated``; with labels, the ``probe_accuracy_*`` of
        `probe_scores`, ``probe_texts`` and ``tpp``, ``tpp_own_drop``,
        ``tpp_other_drop``; with absorption, the scalars of `first_letter_absorption`;
        and ``seconds``, the wall time.
    """
    started = time.perf_counter()
    if labelled is not None:
        labelled_texts, labels = labelled
        labels = np.asarray(labels)
        if len(labels) != len(labelled_texts):
            raise ValueError(
                f"labelled: expected one label per text ({len(labelled_texts)}), got {len(labels)}."
            )
    stages = ["diagnostics", "loss recovered"]
    stages += ["probing and TPP"] if labelled is not None else []
    stages += ["absorption"] if absorption else []
    stages += ["amortisation"] if amortisation else []
    progress = tqdm(total=len(stages), desc="evaluate", unit="stage", disable=not verbose,
                    file=sys.stdout)  # fmt: skip
    with progress:
        progress.set_postfix_str(stages[0])
        diagnostics = DiagnosticsAccumulator(sae)
        kept_rows, n_kept = [], 0
        for batch in extractor.iter_batches(texts):
            diagnostics.update(batch.activations)
            if amortisation and n_kept < AMORTISATION_ROWS:
                kept_rows.append(batch.activations[: AMORTISATION_ROWS - n_kept])
                n_kept += kept_rows[-1].shape[0]
        report = {key: value for key, value in diagnostics.result().items() if np.isscalar(value)}
        _next_stage(progress, stages)
        details = loss_recovered_details(sae, extractor, texts, ablation)
        report.update(
            loss_recovered=details.score,
            kl_divergence=details.kl_sae,
            ce_clean=details.ce_clean,
            ce_sae=details.ce_sae,
            ce_ablated=details.ce_ablated,
        )
        if labelled is not None:
            _next_stage(progress, stages)
            activations_TD, codes_TF, n_tokens_T = pooled_activations(
                sae, extractor, labelled_texts
            )
            pooled = (activations_TD, codes_TF, n_tokens_T, labels)
            report.update(pooled_probe_scores(*pooled, k_values, random_state=random_state))
            kept = n_tokens_T > 0
            report.update(
                targeted_probe_perturbation(
                    sae,
                    activations_TD[kept],
                    codes_TF[kept],
                    labels[kept],
                    random_state=random_state,
                )  # fmt: skip
            )
        if absorption:
            _next_stage(progress, stages)
            options = absorption if isinstance(absorption, dict) else {}
            scores, _ = first_letter_absorption(
                sae, extractor, **{"random_state": random_state, "verbose": verbose, **options}
            )
            report.update(scores)
        if amortisation:
            _next_stage(progress, stages)
            encoder, omp = amortisation_gap(sae, np.concatenate(kept_rows), ("encoder", "omp"))
            report.update(
                omp_explained_variance=omp["explained_variance"],
                omp_mean_l0=omp["mean_l0"],
                amortisation_gap=omp["explained_variance"] - encoder["explained_variance"],
            )
        progress.update()
    report["seconds"] = time.perf_counter() - started
    return report


def _next_stage(progress, stages):
    """Count the stage just done and name the next one on the bar."""
    progress.update()
    progress.set_postfix_str(stages[progress.n])
