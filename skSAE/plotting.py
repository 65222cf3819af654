"""Plots of a fitted SAE (matplotlib, the optional ``plot`` extra).

matplotlib is imported inside each function, so importing this module needs nothing
beyond skSAE's own dependencies. Each function draws on ``ax`` (a new figure when None),
saves the figure to ``path`` when given, and returns the Axes.
"""

import os

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ._array_metrics import latent_density
from ._scoring import pareto_front
from ._sklearn_compat import HasMethods, validate_params
from ._validation import invalid_parameter

__all__ = ["plot_density_histogram", "plot_evaluation", "plot_frontier", "plot_training_curves"]


def _pyplot(name):
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"{name} needs matplotlib: pip install 'skSAE[plot]'") from exc
    return plt


# Constraints shared by every plot: an Axes to draw on, and a file to save to.
_AX_PATH = {
    "ax": [HasMethods(["plot", "hist", "scatter"]), None],
    "path": [str, os.PathLike, None],
}


def _finish(ax, path):
    if path is not None:
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    return ax


@validate_params(
    {"sae": [HasMethods(["transform", "inverse_transform"])], **_AX_PATH},
    prefer_skip_nested_validation=True,
)
def plot_training_curves(sae, ax=None, path=None):
    """Plot the mean training loss of each pass over the data.

    Parameters
    ----------
    sae : SparseAutoencoder
        A fitted estimator; its ``loss_curve_`` holds one value per pass.
    ax : matplotlib.axes.Axes, default=None
        Where to draw; a new figure when None.
    path : str or path, default=None
        Save the figure there too.

    Returns
    -------
    ax : matplotlib.axes.Axes

    Notes
    -----
    The estimator records the loss once per pass (epoch), in the normalised units it
    trains in (see `SparseAutoencoder`), so a single `fit` with ``max_iter=1`` gives a
    single point. Use `partial_fit` over chunks for a finer curve.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from skSAE import SparseAutoencoder
    >>> from skSAE.plotting import plot_training_curves
    >>> X = np.random.default_rng(0).normal(size=(128, 8))
    >>> sae = SparseAutoencoder(n_components=16, k=2, max_iter=3, random_state=0).fit(X)
    >>> len(plot_training_curves(sae).lines[0].get_xdata())
    3
    """
    plt = _pyplot("plot_training_curves")
    check_is_fitted(sae)
    loss = np.asarray(sae.loss_curve_, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    epochs = np.arange(1, len(loss) + 1)
    ax.plot(epochs, loss, "o-", color="tab:blue", label="training loss")
    ax.set_xlabel("pass over the data (epoch)")
    ax.set_ylabel("mean training loss (normalised units)")
    ax.set_title(f"SparseAutoencoder({sae.architecture}), {sae.n_steps_} steps")
    ax.grid(alpha=0.3)
    return _finish(ax, path)


@validate_params(
    {"density_or_codes": ["array-like", "sparse matrix"], **_AX_PATH},
    prefer_skip_nested_validation=True,
)
def plot_density_histogram(density_or_codes, ax=None, path=None):
    """Histogram of log10 latent firing densities, with the silent latents counted.

    Parameters
    ----------
    density_or_codes : array-like of shape (n_components,) or (n_samples, n_components)
        Firing densities (e.g. ``sae.latent_frequency_`` or
        `skSAE.metrics.latent_density`), or codes from `SparseAutoencoder.transform`
        (dense or scipy sparse), from which the densities are computed.
    ax : matplotlib.axes.Axes, default=None
        Where to draw; a new figure when None.
    path : str or path, default=None
        Save the figure there too.

    Returns
    -------
    ax : matplotlib.axes.Axes

    Raises
    ------
    ValueError
        When densities lie outside [0, 1] or the input is neither 1-D nor 2-D.

    Notes
    -----
    Silent latents (density 0: never active on the rows the densities were measured
    on) have no logarithm; they are counted in the title instead.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skSAE.plotting import plot_density_histogram
    >>> ax = plot_density_histogram([0.0, 0.01, 0.1, 0.1])
    >>> ax.get_title()
    '1 of 4 latents silent (25.0%)'
    """
    plt = _pyplot("plot_density_histogram")
    caller = "plot_density_histogram"
    if hasattr(density_or_codes, "getnnz") or np.ndim(density_or_codes) == 2:
        density = latent_density(density_or_codes)
    elif np.ndim(density_or_codes) == 1:
        density = np.asarray(density_or_codes, dtype=float)
        if ((density < 0) | (density > 1)).any() or not np.isfinite(density).all():
            raise invalid_parameter(
                "density_or_codes",
                caller,
                "firing densities in [0, 1] when it is 1-D",
                f"values from {density.min()} to {density.max()}",
            )
    else:
        raise invalid_parameter(
            "density_or_codes",
            caller,
            "densities of shape (n_components,) or codes of shape (n_samples, n_components)",
            f"an array of {np.ndim(density_or_codes)} dimensions",
        )
    if len(density) == 0:
        raise invalid_parameter("density_or_codes", caller, "at least one latent (column)", "none")
    n_silent = int((density == 0).sum())
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    alive = density[density > 0]
    if len(alive):
        ax.hist(np.log10(alive), bins=min(50, max(1, len(alive))), color="tab:blue")
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("latents")
    share = 100 * n_silent / len(density)
    ax.set_title(f"{n_silent} of {len(density)} latents silent ({share:.1f}%)")
    return _finish(ax, path)


@validate_params(
    {"cv_results": [dict], "metric": [str], **_AX_PATH},
    prefer_skip_nested_validation=True,
)
def plot_frontier(cv_results, metric="explained_variance", ax=None, path=None):
    """Plot mean L0 against ``metric`` for every candidate, with the Pareto front.

    Parameters
    ----------
    cv_results : dict
        A search's ``cv_results_`` with ``"neg_l0"`` and ``metric`` among its scores.
    metric : str, default="explained_variance"
        The y axis, e.g. ``"loss_recovered"``.
    ax : matplotlib.axes.Axes, default=None
        Where to draw; a new figure when None.
    path : str or path, default=None
        Save the figure there too.

    Returns
    -------
    ax : matplotlib.axes.Axes

    Raises
    ------
    ValueError
        When `cv_results` lacks the mean test scores of ``"neg_l0"`` or `metric`.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skSAE.plotting import plot_frontier
    >>> results = {"mean_test_neg_l0": [-8, -16], "mean_test_explained_variance": [0.6, 0.8],
    ...            "params": [{"k": 8}, {"k": 16}]}
    >>> plot_frontier(results).get_xlabel()
    'L0 (mean active latents per token)'
    """
    plt = _pyplot("plot_frontier")
    missing = [
        key
        for key in ("mean_test_neg_l0", f"mean_test_{metric}", "params")
        if key not in cv_results
    ]
    if missing:
        raise invalid_parameter(
            "cv_results",
            "plot_frontier",
            f"a search's cv_results_ with 'neg_l0' and {metric!r} among its scores",
            f"a dict without {missing}",
        )
    l0 = -np.asarray(cv_results["mean_test_neg_l0"], dtype=float)
    score = np.asarray(cv_results[f"mean_test_{metric}"], dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    labels = [_short_params(params) for params in cv_results["params"]]
    ax.scatter(l0, score, color="tab:gray", label="candidates")
    for x, y, label in zip(l0, score, labels, strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(l0, score)
    ax.plot(l0[front], score[front], "o-", color="tab:blue", label="Pareto front")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.legend()
    ax.grid(alpha=0.3)
    return _finish(ax, path)


def _short_params(params):
    """``{"sae__architecture": "topk", "sae__k": 16}`` -> ``"topk, k=16"``."""
    parts = []
    for name, value in params.items():
        name = name.split("__")[-1]
        parts.append(str(value) if name == "architecture" else f"{name}={value}")
    return ", ".join(parts)


@validate_params(
    {"reports": [list], "names": [list, None], "path": [str, os.PathLike, None]},
    prefer_skip_nested_validation=True,
)
def plot_evaluation(reports, names=None, path=None):
    """One figure of `skSAE.evaluation.evaluate` reports: quality and usefulness against L0.

    Panels: explained variance and loss recovered; the sparse probes' accuracy (top-1,
    top-5, all latents) with the model's own probe as a line; and, where the reports
    have them, TPP and absorption. Each SAE is one point per panel, named.

    Parameters
    ----------
    reports : list of dict
        One `evaluate` report per SAE.
    names : list of str, default=None
        A label per report (``report["name"]`` or its index when None).
    path : str or path, default=None
        Save the figure there too.

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    plt = _pyplot("plot_evaluation")
    if not reports:
        raise invalid_parameter("reports", "plot_evaluation", "at least one report", "[]")
    if names is None:
        names = [str(report.get("name", index)) for index, report in enumerate(reports)]
    l0 = np.array([report["mean_l0"] for report in reports], dtype=float)
    panels = [("reconstruction", ["explained_variance", "loss_recovered"])]
    probes = ["probe_accuracy_top_1", "probe_accuracy_top_5", "probe_accuracy_all_latents"]
    if any(key in reports[0] for key in probes):
        panels.append(("sparse probing (balanced accuracy)", probes))
    extra = [key for key in ("tpp", "mean_absorption_fraction_score") if key in reports[0]]
    if extra:
        panels.append(("TPP and absorption", extra))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            values = np.array([report.get(key, np.nan) for report in reports], dtype=float)
            ax.plot(l0, values, "o", label=key.replace("probe_accuracy_", "").replace("_", " "))
            for x, y, name in zip(l0, values, names, strict=True):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if "probe_accuracy_model" in reports[0] and title.startswith("sparse"):
            ax.axhline(reports[0]["probe_accuracy_model"], color="tab:gray", ls="--",
                       label="model activations")  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("L0 (mean active latents per token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    return figure
