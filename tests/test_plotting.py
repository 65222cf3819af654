"""Plots on the Agg backend: Axes content and saved files."""

import numpy as np
import pytest
import scipy.sparse as sp

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402

from skSAE import SparseAutoencoder  # noqa: E402
from skSAE.metrics import plot_frontier as metrics_plot_frontier  # noqa: E402
from skSAE.plotting import (  # noqa: E402
    plot_density_histogram,
    plot_frontier,
    plot_training_curves,
)


@pytest.fixture
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def fitted_sae(small_X):
    return SparseAutoencoder(n_components=16, k=2, max_iter=3, device="cpu", random_state=0).fit(
        small_X
    )


def test_plot_training_curves_draws_one_point_per_epoch(fitted_sae, tmp_path, close_figures):
    path = tmp_path / "curves.png"
    ax = plot_training_curves(fitted_sae, path=path)
    (line,) = ax.lines
    np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(line.get_ydata(), fitted_sae.loss_curve_)
    assert "epoch" in ax.get_xlabel() and "loss" in ax.get_ylabel()
    assert path.stat().st_size > 0


def test_plot_training_curves_draws_on_the_given_axes(fitted_sae, close_figures):
    _, ax = plt.subplots()
    assert plot_training_curves(fitted_sae, ax=ax) is ax


def test_plot_training_curves_needs_a_fitted_sae(close_figures):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        plot_training_curves(SparseAutoencoder())


def test_plot_density_histogram_counts_alive_latents_and_names_silent(tmp_path, close_figures):
    density = np.array([0.0, 0.0, 1e-3, 1e-2, 1e-2, 0.5])
    path = tmp_path / "density.png"
    ax = plot_density_histogram(density, path=path)
    heights = [patch.get_height() for patch in ax.patches]
    assert sum(heights) == 4  # the 4 alive latents, in log10 bins
    assert ax.get_title() == "2 of 6 latents silent (33.3%)"
    assert ax.get_xlabel() == "log10 firing density"
    lows = [patch.get_x() for patch in ax.patches]
    assert min(lows) == pytest.approx(-3) and max(lows) < np.log10(0.5)
    assert path.stat().st_size > 0


@pytest.mark.parametrize("sparse", [False, True])
def test_plot_density_histogram_accepts_codes(sparse, close_figures):
    codes = np.zeros((10, 5))
    codes[:5, 0] = 1.0
    codes[:1, 1] = 2.0
    ax = plot_density_histogram(sp.csr_matrix(codes) if sparse else codes)
    assert sum(patch.get_height() for patch in ax.patches) == 2
    assert ax.get_title().startswith("3 of 5 latents silent")


def test_plot_density_histogram_all_dead_draws_no_bar(close_figures):
    ax = plot_density_histogram(np.zeros(4))
    assert len(ax.patches) == 0
    assert ax.get_title().startswith("4 of 4")


@pytest.mark.parametrize("bad", [[0.5, 1.5], [-0.1], np.zeros((2, 2, 2)), []])
def test_plot_density_histogram_rejects_invalid_input(bad, close_figures):
    with pytest.raises(ValueError, match="density_or_codes"):
        plot_density_histogram(bad)


def test_plot_frontier_is_reexported(tmp_path, close_figures):
    assert plot_frontier is metrics_plot_frontier
    cv_results = {
        "mean_test_neg_l0": [-2.0, -4.0, -8.0],
        "mean_test_explained_variance": [0.5, 0.7, 0.65],
        "params": [{"k": 2}, {"k": 4}, {"k": 8}],
    }
    path = tmp_path / "frontier.png"
    ax = plot_frontier(cv_results, path=path)
    front = ax.lines[0]
    np.testing.assert_array_equal(front.get_xdata(), [2.0, 4.0])
    assert path.stat().st_size > 0


def test_plot_frontier_rejects_results_without_the_metric(close_figures):
    cv_results = {"mean_test_neg_l0": [-2.0], "params": [{"k": 2}]}
    with pytest.raises(
        ValueError,
        match=r"The 'cv_results' parameter of plot_frontier must be a search's cv_results_ "
        r"with 'neg_l0' and 'loss_recovered' among its scores\. Got a dict without "
        r"\['mean_test_loss_recovered'\] instead\.",
    ):
        plot_frontier(cv_results, metric="loss_recovered")


@pytest.mark.parametrize(
    ("plot", "kwargs", "name"),
    [
        (plot_density_histogram, {"density_or_codes": "dense"}, "density_or_codes"),
        (plot_density_histogram, {"density_or_codes": [0.5], "ax": "left"}, "ax"),
        (plot_density_histogram, {"density_or_codes": [0.5], "path": 3}, "path"),
        (plot_frontier, {"cv_results": [], "metric": "neg_fvu"}, "cv_results"),
        (plot_frontier, {"cv_results": {}, "metric": 1}, "metric"),
    ],
)
def test_plots_name_the_argument_of_the_wrong_type(plot, kwargs, name, close_figures):
    with pytest.raises(ValueError, match=rf"The '{name}' parameter of {plot.__name__} must be"):
        plot(**kwargs)


@pytest.mark.parametrize("bad", [[0.5, 1.5], np.zeros((2, 2, 2)), []])
def test_plot_density_histogram_errors_say_what_was_received(bad, close_figures):
    with pytest.raises(
        ValueError, match=r"The 'density_or_codes' parameter of plot_density_histogram must be "
    ) as error:
        plot_density_histogram(bad)
    assert str(error.value).endswith(" instead.")
