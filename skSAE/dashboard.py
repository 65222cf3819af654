"""A static, self-contained HTML dashboard of a sparse autoencoder's latents.

`write_dashboard` computes the overview metrics and the top-activating examples, and
`render_dashboard` turns them into one HTML file: inline CSS, inline SVG charts and a
small inline script (no external URL, so it opens offline in any browser). Every string
that comes from the corpus or the tokenizer is escaped with `html.escape`: the corpus is
untrusted input.

The public entry point is also importable as ``skSAE.interpret.write_dashboard``.
"""

import html
import math
import os
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ._sklearn_compat import HasMethods, Interval, validate_params
from ._top_activations import collect_reports
from ._validation import check_latents, invalid_parameter

__all__ = ["render_dashboard", "write_dashboard"]

_REQUIRED_OVERVIEW_KEYS = (
    "n_tokens",
    "l0",
    "explained_variance",
    "silent_fraction",
    "density",
    "n_components",
)
# Tokens are their own text (`token_texts`); line breaks and tabs are shown as marks.
_TOKEN_MARKERS = {"\n": "↵", "\t": "⇥", "\r": ""}
# In the lists of promoted and suppressed tokens, a space is shown as a mark, so that
# " the" and "the" (two tokens) read differently.
_SPACE_MARK = "␣"
# Shading colour of activating tokens (RGB); alpha is activation / max activation.
_SHADE_RGB = "234, 88, 12"


@validate_params(
    {
        "sae": [HasMethods(["transform", "inverse_transform", "score"])],
        "extractor": [HasMethods(["iter_batches", "extract", "load"])],
        "texts": ["array-like"],
        "path": [str, os.PathLike],
        "latents": [Integral, "array-like", None],
        "n_latents": [Interval(Integral, 1, None, closed="left")],
        "k": [Interval(Integral, 1, None, closed="left")],
        "loss_recovered": [Real, None],
        "title": [str, None],
        "verbose": ["verbose"],
    },
    prefer_skip_nested_validation=True,
)
def write_dashboard(
    sae,
    extractor,
    texts,
    path,
    *,
    latents=None,
    n_latents=20,
    k=10,
    loss_recovered=None,
    title=None,
    verbose=0,
):
    """Write a self-contained HTML dashboard of an SAE's latents on some texts.

    The page has an overview (tokens, mean L0, variance explained, loss recovered when
    given, the fraction of latents silent on the texts, a histogram of latent densities)
    and one panel per latent: density, max activation, top-activating examples with
    every token shaded by its activation, samples from lower activation quantiles, a
    histogram of the latent's activations, and the tokens its decoder direction most
    promotes and suppresses. A search box filters latents by index or by the text of
    their examples.

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted on activations of `extractor`.
    extractor : ActivationExtractor
        Produces the activations the SAE reads.
    texts : list of str
        Corpus to look for activating examples in (untrusted: it is escaped).
    path : str or path-like
        HTML file to write; missing parent folders are created.
    latents : int or list of int, default=None
        Latents to show. ``None`` picks `n_latents` latents active on `texts`, spread
        over densities: the most frequent half, then evenly spaced ranks of the rest
        down to the rarest (deterministic).
    n_latents : int, default=20
        Number of latents picked when `latents` is None.
    k : int, default=10
        Top-activating examples per latent.
    loss_recovered : float, default=None
        Loss recovered of the SAE (e.g. from `skSAE.metrics.loss_recovered`), shown in
        the overview when given; it is not computed here because it costs forward passes.
    title : str, default=None
        Page title; defaults to ``"skSAE dashboard"``.
    verbose : int, default=0
        Progress bar (stdout) while collecting examples.

    Returns
    -------
    path : pathlib.Path
        The written file.

    Raises
    ------
    ValueError
        If `latents` holds an index outside ``[0, n_components)``, `n_latents` or `k` is
        not a positive integer, or another argument is not of its documented type.

    See Also
    --------
    skSAE.dashboard.render_dashboard : The HTML of the page, from precomputed reports.
    skSAE.interpret.top_activating_examples : The per-latent reports shown here.

    Notes
    -----
    The model reads the texts once, in one streaming pass that measures the overview
    and follows every latent (its top ``k`` activations with the values around them, a
    random sample and a histogram), so memory grows with ``n_components``, not with the
    corpus: neither the activations nor the codes of the whole corpus are held. The
    latents are picked once the pass is over, and their reports are those of
    `skSAE.interpret.top_activating_examples` (up to float rounding and the bin edges
    of the activation histograms). With ``memory=`` set on the extractor, the rows come
    from its cached extraction instead (computed and cached first when missing), so
    the model does not run at all when the same texts were extracted before; that
    extraction is then held in memory.

    Examples
    --------
    >>> from skSAE.interpret import write_dashboard  # doctest: +SKIP
    >>> write_dashboard(sae, extractor, texts, "dashboard.html")  # doctest: +SKIP
    PosixPath('dashboard.html')
    """
    check_is_fitted(sae)
    texts = list(texts)
    n_components = sae.components_.shape[0]
    if latents is None:

        def choose(density):
            return _pick_latents(density, n_latents)

    else:
        chosen = check_latents(
            latents, n_components, "latents", "write_dashboard", allow_empty=True
        )

        def choose(density):
            return chosen

    # With memory= the extraction is the cached one (or is cached for the next call);
    # otherwise the texts stream through the model once, batch by batch.
    extraction = extractor.extract(texts) if getattr(extractor, "memory", None) else None
    reports, stats = collect_reports(
        sae, extractor, texts, choose, k=k, verbose=verbose, extraction=extraction
    )
    del extraction
    overview = {
        **stats,
        "loss_recovered": None if loss_recovered is None else float(loss_recovered),
        "model": _model_name(extractor),
        "hook": getattr(extractor, "hook", None),
        "layer": getattr(extractor, "layer", None),
        "n_components": n_components,
    }

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_dashboard(reports, overview, title), encoding="utf-8")
    return path


@validate_params(
    {"reports": [dict], "overview": [dict], "title": [str, None]},
    prefer_skip_nested_validation=True,
)
def render_dashboard(reports, overview, title):
    """HTML of the dashboard page, from latent reports and overview metrics.

    A pure function: no model, no file, no randomness. Every corpus or token string is
    escaped with `html.escape`.

    Parameters
    ----------
    reports : dict of int to LatentReport
        One panel per entry, in the dict's order (as returned by
        `skSAE.interpret.top_activating_examples`).
    overview : dict
        ``"n_tokens"`` (int), ``"l0"`` (float), ``"explained_variance"`` (float),
        ``"silent_fraction"`` (float, latents never active on these tokens), ``"density"``
        (array of shape (n_components,), the
        firing frequency of every latent), ``"n_components"`` (int), and optionally
        ``"loss_recovered"`` (float or None), ``"model"``, ``"hook"`` and ``"layer"``.
    title : str or None
        Page title; None gives ``"skSAE dashboard"``.

    Returns
    -------
    page : str
        A complete HTML document.

    Raises
    ------
    ValueError
        If `overview` lacks a required key, or an argument is not of its documented type.

    See Also
    --------
    write_dashboard : Compute the reports and overview, and write the page to a file.

    Examples
    --------
    >>> import numpy as np
    >>> overview = {"n_tokens": 4, "l0": 1.5, "explained_variance": 0.9,
    ...             "silent_fraction": 0.5, "density": np.array([0.5, 0.0]), "n_components": 2}
    >>> page = render_dashboard({}, overview, "<empty>")
    >>> page.startswith("<!DOCTYPE html>"), "&lt;empty&gt;" in page
    (True, True)
    """
    missing = [key for key in _REQUIRED_OVERVIEW_KEYS if key not in overview]
    if missing:
        raise invalid_parameter(
            "overview",
            "render_dashboard",
            f"a dict with the keys {list(_REQUIRED_OVERVIEW_KEYS)}",
            f"a dict missing {missing}",
        )
    title = "skSAE dashboard" if title is None else str(title)
    items = "".join(_latent_item(report, i == 0) for i, report in enumerate(reports.values()))
    panels = "".join(_latent_panel(report, i == 0) for i, report in enumerate(reports.values()))
    if not reports:
        items = '<li class="empty">No latent to show (all silent on these texts?).</li>'
    return _PAGE.format(
        title=_e(title),
        style=_STYLE,
        script=_SCRIPT,
        subtitle=_subtitle(overview),
        overview=_overview(overview),
        n_panels=len(reports),
        items=items,
        panels=panels,
    )


# ---------------------------------------------------------------------------------------
# Latent selection


def _pick_latents(density, n_latents):
    """Alive latents spread over densities: the most frequent half, then even ranks."""
    density = np.asarray(density, dtype=np.float64)
    # Stable sort, so ties keep index order and the choice is deterministic.
    alive = [int(i) for i in np.argsort(-density, kind="stable") if density[i] > 0]
    if len(alive) <= n_latents:
        return alive
    n_top = n_latents // 2
    rest = alive[n_top:]
    # Evenly spaced ranks ending at the rarest alive latent (the start is left out: it
    # would sit right next to the most frequent ones).
    ranks = np.linspace(0, len(rest) - 1, n_latents - n_top + 1)[1:].round().astype(int)
    picked = alive[:n_top] + [rest[r] for r in ranks]
    return sorted(picked, key=lambda i: (-density[i], i))


def _model_name(extractor):
    model = getattr(extractor, "model", None)
    if model is None or isinstance(model, str):
        return model
    if hasattr(model, "__fspath__"):
        return str(model)
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or type(model).__name__


# ---------------------------------------------------------------------------------------
# Formatting


def _e(text):
    return html.escape(str(text), quote=True)


def _display_token(token):
    text = str(token)
    for marker, shown in _TOKEN_MARKERS.items():
        text = text.replace(marker, shown)
    return text


def _number(value, spec=".3g"):
    if value is None or (isinstance(value, Real) and not math.isfinite(value)):
        return "—"
    return format(float(value), spec)


def _percent(value):
    if value is None or not math.isfinite(value):
        return "—"
    if value == 0:
        return "0%"
    return f"{100 * value:.3g}%"


def _alpha(activation, max_activation):
    if max_activation is None or not max_activation > 0 or not math.isfinite(activation):
        return 0.0
    return min(max(activation / max_activation, 0.0), 1.0)


# ---------------------------------------------------------------------------------------
# Page parts


def _subtitle(overview):
    parts = []
    model = overview.get("model")
    if model is not None:
        # An absolute path is shown by its last part; hovering shows all of it.
        shown = Path(model).name if os.path.isabs(str(model)) else model
        parts.append(f'model <b title="{_e(model)}">{_e(shown)}</b>')
    hook = overview.get("hook")
    if hook is not None:
        layer = overview.get("layer")
        named = hook in ("resid_post", "attn_out", "mlp_out") and layer is not None
        where = f"{hook}, layer {layer}" if named else hook
        parts.append(f"hook <b>{_e(where)}</b>")
    parts.append(f"<b>{_e(overview['n_components'])}</b> latents")
    return " · ".join(parts)


def _stat(label, value, hint):
    return (
        f'<div class="stat" title="{_e(hint)}"><div class="value">{_e(value)}</div>'
        f'<div class="label">{_e(label)}</div></div>'
    )


def _overview(overview):
    density = np.asarray(overview["density"], dtype=np.float64)
    n_silent = int(np.sum(density == 0))
    stats = "".join(
        [
            _stat("tokens", f"{int(overview['n_tokens']):,}", "rows the metrics were measured on"),
            _stat("mean L0", _number(overview["l0"], ".1f"), "active latents per token"),
            _stat(
                "variance explained",
                _number(overview["explained_variance"], ".3f"),
                "1 - FVU of the reconstruction",
            ),
            _stat(
                "loss recovered",
                _number(overview.get("loss_recovered"), ".3f"),
                "(CE_ablated - CE_sae) / (CE_ablated - CE_clean); — when not computed",
            ),
            _stat(
                "silent latents",
                _percent(overview["silent_fraction"]),
                "never active on these tokens (not the training dead_fraction_)",
            ),
        ]
    )
    alive = density[density > 0]
    if alive.size:
        log_density = np.log10(alive)
        low = min(math.floor(log_density.min()), -1)
        counts, edges = np.histogram(log_density, bins=30, range=(low, 0))
        decades = [(value, f"1e{value}" if value else "1") for value in range(low, 1)]
        chart = _svg_histogram(
            counts,
            edges,
            xlabel="density of active latents (log scale)",
            width=520,
            height=150,
            xticks=decades,
        )
    else:
        chart = '<p class="muted">No latent is active on these texts.</p>'
    caption = f"{density.size} latents: {len(alive)} active, {n_silent} silent on these tokens"
    return (
        f'<section class="overview"><div class="stats">{stats}</div>'
        f'<figure class="density">{chart}<figcaption>Latent density: '
        f"{_e(caption)}</figcaption></figure></section>"
    )


def _svg_histogram(counts, edges, *, xlabel, width=320, height=120, xticks=None):
    """An inline SVG bar chart of histogram counts, with a tooltip per bar.

    `xticks` is a list of ``(value, label)``; by default the two outer edges are labelled.
    """
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    left, right, top, bottom = 34, 8, 8, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = counts.max() if counts.size and counts.max() > 0 else 1.0
    bar_w = plot_w / max(counts.size, 1)
    bars = []
    for i, count in enumerate(counts):
        h = plot_h * count / peak
        x = left + i * bar_w
        tip = f"{_number(edges[i])} to {_number(edges[i + 1])}: {int(count)}"
        bars.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 1, 0.5):.1f}" '
            f'height="{h:.1f}"><title>{_e(tip)}</title></rect>'
        )
    y0 = top + plot_h
    if xticks is None:
        xticks = [(edges[0], _number(edges[0])), (edges[-1], _number(edges[-1]))]
    span = (edges[-1] - edges[0]) or 1.0
    ticks = []
    for value, label in xticks:
        x = left + plot_w * (value - edges[0]) / span
        anchor = "start" if x <= left + 1 else "end" if x >= left + plot_w - 1 else "middle"
        ticks.append(
            f'<line class="axis" x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 3}"/>'
            f'<text x="{x:.1f}" y="{y0 + 13}" text-anchor="{anchor}">{_e(label)}</text>'
        )
    return (
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{_e(xlabel)}">'
        f'<line class="axis" x1="{left}" y1="{y0}" x2="{width - right}" y2="{y0}"/>'
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{y0}"/>'
        f"{''.join(bars)}"
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{int(peak)}</text>'
        f'<text x="{left - 4}" y="{y0}" text-anchor="end">0</text>'
        f"{''.join(ticks)}"
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 3}" text-anchor="middle" '
        f'class="xlabel">{_e(xlabel)}</text></svg>'
    )


def _top_token(report):
    if not report.top:
        return ""
    example = report.top[0]
    if not 0 <= example.marked < len(example.tokens):
        return ""
    text = _display_token(example.tokens[example.marked])
    # A whitespace-only token would leave the hint blank.
    return text.replace(" ", _SPACE_MARK) if text and not text.strip() else text


def _latent_item(report, active):
    search = " ".join(
        _display_token(token).strip().lower()
        for example in report.top
        for token in example.tokens
        if _display_token(token).strip()
    )
    search += " " + " ".join(_display_token(t).strip().lower() for t, _ in report.promoted)
    cls = "latent-item active" if active else "latent-item"
    return (
        f'<li><a class="{cls}" href="#latent-{int(report.latent)}" '
        f'data-latent="{int(report.latent)}" data-search="{_e(search)}">'
        f'<span class="id">#{int(report.latent)}</span>'
        f'<span class="tok-hint">{_e(_top_token(report))}</span>'
        f'<span class="dens">{_e(_percent(report.density))}</span></a></li>'
    )


def _example(example, max_activation):
    spans = []
    for i, (token, activation) in enumerate(
        zip(example.tokens, example.token_activations, strict=False)
    ):
        activation = float(activation)
        alpha = _alpha(activation, max_activation)
        cls = "tok mark" if i == example.marked else "tok"
        style = f' style="background:rgba({_SHADE_RGB},{alpha:.2f})"' if alpha > 0 else ""
        spans.append(
            f'<span class="{cls}"{style} title="activation {_number(activation, ".4g")}">'
            f"{_e(_display_token(token))}</span>"
        )
    where = f"doc {int(example.doc_index)}, token {int(example.position)}"
    return (
        f'<div class="example"><span class="act" title="{_e(where)}">'
        f"{_e(_number(example.activation, '.3g'))}</span>"
        f'<span class="ctx">{"".join(spans)}</span></div>'
    )


def _logit_token(token):
    return _display_token(token).replace(" ", _SPACE_MARK)


def _logit_list(pairs, cls):
    if not pairs:
        return '<p class="muted">—</p>'
    rows = "".join(
        f'<li><span class="logit-tok">{_e(_logit_token(token))}</span>'
        f'<span class="logit-val">{_e(_number(value, "+.3g"))}</span></li>'
        for token, value in pairs
    )
    return f'<ol class="logits {cls}">{rows}</ol>'


def _latent_panel(report, active):
    latent = int(report.latent)
    top = "".join(_example(example, report.max_activation) for example in report.top)
    if not top:
        top = '<p class="muted">Never active on these texts.</p>'
    quantiles = "".join(
        f"<h4>Quantile {_e(label)}</h4>"
        + "".join(_example(example, report.max_activation) for example in examples)
        for label, examples in report.quantiles
        if examples
    )
    counts, edges = report.histogram
    if np.asarray(counts).size:
        histogram = _svg_histogram(counts, edges, xlabel="activation (where non-zero)")
    else:
        histogram = '<p class="muted">No activations.</p>'
    cls = "panel active" if active else "panel"
    return (
        f'<section class="{cls}" id="latent-{latent}" data-latent="{latent}">'
        f"<header><h2>Latent {latent}</h2>"
        f'<span class="pill">density {_e(_percent(report.density))}</span>'
        f'<span class="pill">max activation {_e(_number(report.max_activation))}</span>'
        f"</header>"
        f'<div class="row"><figure>{histogram}</figure>'
        f'<div class="logit-col"><h3>Promoted tokens</h3>'
        f"{_logit_list(report.promoted, 'promoted')}</div>"
        f'<div class="logit-col"><h3>Suppressed tokens</h3>'
        f"{_logit_list(report.suppressed, 'suppressed')}</div></div>"
        f'<h3>Top activations</h3><div class="examples">{top}</div>'
        + (
            f'<h3>Samples from lower quantiles</h3><div class="examples">{quantiles}</div>'
            if quantiles
            else ""
        )
        + "</section>"
    )


_STYLE = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg: #f6f8fa; --accent: #1d4ed8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: #fff; }
header.top { padding: 14px 24px; border-bottom: 1px solid var(--line); background: var(--bg); }
header.top h1 { margin: 0 0 2px; font-size: 20px; }
.sub, .muted { color: var(--muted); }
.overview { display: flex; flex-wrap: wrap; gap: 16px 32px; align-items: center;
  padding: 14px 24px; border-bottom: 1px solid var(--line); }
.stats { display: flex; flex-wrap: wrap; gap: 10px; }
.stat { border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 112px; }
.stat .value { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
.stat .label { color: var(--muted); font-size: 12px; }
figure { margin: 0; }
figcaption { color: var(--muted); font-size: 12px; }
svg.hist rect { fill: #6b8fd6; }
svg.hist rect:hover { fill: var(--accent); }
svg.hist .axis { stroke: #8c959f; }
svg.hist text { font-size: 10px; fill: var(--muted); }
main { display: flex; align-items: flex-start; }
nav { position: sticky; top: 0; width: 250px; flex: none; max-height: 100vh; overflow-y: auto;
  border-right: 1px solid var(--line); padding: 12px; }
nav input { width: 100%; padding: 6px 8px; border: 1px solid var(--line); border-radius: 6px;
  font: inherit; }
nav ul { list-style: none; margin: 8px 0 0; padding: 0; }
.latent-item { display: flex; gap: 8px; padding: 4px 8px; border-radius: 6px; color: inherit;
  text-decoration: none; font-variant-numeric: tabular-nums; }
.latent-item:hover { background: var(--bg); }
.latent-item.active { background: #dbe6fb; }
.latent-item .id { font-weight: 600; min-width: 44px; }
.latent-item .tok-hint { flex: 1; font-family: ui-monospace, Menlo, Consolas, monospace;
  white-space: pre; overflow: hidden; text-overflow: ellipsis; }
.latent-item .dens { color: var(--muted); font-size: 12px; }
#panels { flex: 1; min-width: 0; padding: 12px 24px 40px; }
.panel { display: none; }
.panel.active { display: block; }
.panel header { display: flex; align-items: baseline; gap: 10px; flex-wrap: wrap; }
.panel h2 { margin: 4px 12px 8px 0; font-size: 18px; }
.panel h3 { margin: 16px 0 6px; font-size: 14px; }
.panel h4 { margin: 10px 0 4px; font-size: 12px; color: var(--muted); font-weight: 500; }
.pill { background: var(--bg); border: 1px solid var(--line); border-radius: 999px;
  padding: 1px 10px; font-size: 12px; font-variant-numeric: tabular-nums; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.logit-col { min-width: 160px; }
.logits { margin: 0; padding-left: 22px; font-size: 13px; }
.logits li { font-variant-numeric: tabular-nums; }
.logit-tok { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre;
  background: var(--bg); border-radius: 3px; padding: 0 3px; margin-right: 8px;
  unicode-bidi: isolate-override; direction: ltr; }
/* A token's characters in their own order: a right-to-left letter would otherwise
   carry a neighbouring "<0xD7>" or value along with it. */
.promoted .logit-val { color: #1a7f37; }
.suppressed .logit-val { color: #cf222e; }
.example { display: flex; gap: 10px; padding: 3px 0; border-bottom: 1px solid #eef1f4; }
.example .act { flex: none; width: 52px; text-align: right; color: var(--muted);
  font-variant-numeric: tabular-nums; }
.ctx { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px;
  white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 2px; unicode-bidi: isolate; }
.tok.mark { outline: 2px solid var(--accent); outline-offset: 0; }
#errors { display: none; }
@media print { nav { display: none; } .panel { display: block; page-break-inside: avoid; } }
"""

_SCRIPT = """
(function () {
  "use strict";
  var errors = document.getElementById("errors");
  window.addEventListener("error", function (event) {
    errors.textContent += (event.message || "script error") + "\\n";
    document.body.dataset.errors = "1";
  });
  var items = Array.prototype.slice.call(document.querySelectorAll(".latent-item"));
  var panels = Array.prototype.slice.call(document.querySelectorAll(".panel"));
  function show(latent) {
    var found = false;
    panels.forEach(function (panel) {
      var on = panel.dataset.latent === latent;
      found = found || on;
      panel.classList.toggle("active", on);
    });
    items.forEach(function (item) {
      item.classList.toggle("active", item.dataset.latent === latent);
    });
    return found;
  }
  function fromHash() {
    var match = /^#latent-(\\d+)$/.exec(window.location.hash);
    return match !== null && show(match[1]);
  }
  window.addEventListener("hashchange", fromHash);
  if (!fromHash() && items.length) { show(items[0].dataset.latent); }
  var search = document.getElementById("search");
  search.addEventListener("input", function () {
    var query = search.value.trim().toLowerCase();
    var id = query.replace(/^#/, "");
    items.forEach(function (item) {
      var hit = !query || item.dataset.latent === id || item.dataset.search.indexOf(query) >= 0;
      item.parentNode.hidden = !hit;
    });
  });
  document.addEventListener("keydown", function (event) {
    if (event.target === search || (event.key !== "ArrowDown" && event.key !== "ArrowUp")) {
      return;
    }
    var visible = items.filter(function (item) { return !item.parentNode.hidden; });
    var at = visible.findIndex(function (item) { return item.classList.contains("active"); });
    var next = visible[at + (event.key === "ArrowDown" ? 1 : -1)];
    if (next) { event.preventDefault(); window.location.hash = "latent-" + next.dataset.latent; }
  });
  document.body.dataset.ready = "1";
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
<noscript><style>.panel {{ display: block; }}</style></noscript>
</head>
<body data-ready="0">
<header class="top"><h1>{title}</h1><div class="sub">{subtitle}</div></header>
{overview}
<main>
<nav><input id="search" type="search" placeholder="Search: latent # or token"
 aria-label="Search latents" autocomplete="off">
<ul id="latent-list" data-count="{n_panels}">{items}</ul></nav>
<div id="panels">{panels}</div>
</main>
<pre id="errors"></pre>
<script>{script}</script>
</body>
</html>
"""
