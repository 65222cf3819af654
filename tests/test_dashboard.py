"""Tests of the HTML dashboard: rendering, escaping, latent choice, and a real browser."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from sklearn.base import clone

from skSAE.dashboard import _pick_latents, render_dashboard, write_dashboard
from skSAE.interpret import ActivatingExample, LatentReport

EVIL = "<script>alert(1)</script>"


def make_example(tokens, activations, marked, doc_index=0, position=0):
    return ActivatingExample(
        activation=float(activations[marked]),
        doc_index=doc_index,
        position=position,
        tokens=list(tokens),
        token_activations=[float(a) for a in activations],
        marked=marked,
    )


def make_report(latent, tokens=None, max_activation=4.0):
    """A hand-built report whose top example activates on its middle token."""
    tokens = tokens or ["The", " quick", " brown", " fox", "\n", " jumps"]
    rng = np.random.default_rng(latent)
    top = []
    for rank in range(3):
        activations = rng.uniform(0, 1, size=len(tokens))
        activations[2] = max_activation - rank
        top.append(make_example(tokens, activations, 2, doc_index=rank, position=10 + rank))
    low = make_example(tokens, np.full(len(tokens), 0.5), 1, doc_index=7, position=3)
    counts = np.array([5, 3, 2, 1])
    return LatentReport(
        latent=latent,
        density=0.0125,
        max_activation=max_activation,
        top=top,
        quantiles=[("25-50%", [low]), ("0-25%", [])],
        histogram=(counts, np.linspace(0.0, max_activation, counts.size + 1)),
        promoted=[(" dog", 1.25), ("cat", 0.5)],
        suppressed=[(" the", -0.75)],
    )


def make_overview(**changes):
    density = np.array([0.5, 0.0125, 0.001, 0.0, 0.0, 1e-4, 0.2, 0.03])
    overview = {
        "n_tokens": 12345,
        "l0": 7.25,
        "explained_variance": 0.8125,
        "loss_recovered": 0.9375,
        "silent_fraction": 0.25,
        "density": density,
        "model": "tiny-gpt2",
        "hook": "resid_post",
        "layer": 1,
        "n_components": density.size,
    }
    overview.update(changes)
    return overview


def make_reports():
    reports = {latent: make_report(latent) for latent in (3, 17, 42)}
    reports[99] = make_report(99, tokens=["a", EVIL, "\"&'", " b"])
    return reports


def test_render_dashboard_has_one_panel_per_latent():
    page = render_dashboard(make_reports(), make_overview(), "test")
    assert len(re.findall(r'<section class="panel[ "]', page)) == 4
    for latent in (3, 17, 42, 99):
        assert f'id="latent-{latent}"' in page
        assert f'href="#latent-{latent}"' in page
    assert page.count('class="panel active"') == 1


def test_render_dashboard_escapes_corpus_text():
    page = render_dashboard(make_reports(), make_overview(), '<b>"title"</b>')
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&amp;&#x27;" in page
    assert "&lt;b&gt;&quot;title&quot;&lt;/b&gt;" in page
    # The page's only script element is its own.
    assert page.count("<script") == 1


def test_render_dashboard_shows_overview_numbers():
    page = render_dashboard(make_reports(), make_overview(), "test")
    for shown in ("12,345", "7.2", "0.812", "0.938", "25%", "tiny-gpt2", "resid_post, layer 1"):
        assert shown in page
    assert "8 latents: 6 active, 2 silent on these tokens" in page
    # Never active on these tokens, not the training dead_fraction_: named apart.
    assert "silent latents" in page and "dead" not in page.replace("dead_fraction_", "")


def test_render_dashboard_without_loss_recovered_shows_dash():
    page = render_dashboard(make_reports(), make_overview(loss_recovered=None), "test")
    assert re.search(r'<div class="value">—</div><div class="label">loss recovered', page)


def test_render_dashboard_shades_tokens_by_activation():
    report = make_report(5, tokens=["x", "y", "z"], max_activation=4.0)
    example = make_example(["x", "y", "z"], [0.0, 2.0, 4.0], 2)
    page = render_dashboard({5: report._replace(top=[example])}, make_overview(), "test")
    assert '<span class="tok" title="activation 0">x</span>' in page
    assert 'style="background:rgba(234, 88, 12,0.50)" title="activation 2">y</span>' in page
    assert (
        '<span class="tok mark" style="background:rgba(234, 88, 12,1.00)" '
        'title="activation 4">z</span>'
    ) in page


def test_render_dashboard_marks_line_breaks_and_the_spaces_of_logit_tokens():
    page = render_dashboard({3: make_report(3)}, make_overview(), "test")
    assert "> quick</span>" in page  # in a context, a space is a space
    assert ">↵</span>" in page
    # In the logit lists, " dog" and "cat" read differently.
    assert '<span class="logit-tok">␣dog</span>' in page
    assert '<span class="logit-tok">cat</span>' in page


def test_render_dashboard_shows_token_text_as_it_is():
    # Tokens are their own text (token_texts): a "Ġ" in the corpus is a letter, not a space.
    report = make_report(3, tokens=["Ġż", "<0xE2>", " x"])
    page = render_dashboard({3: report}, make_overview(), "test")
    assert ">Ġż</span>" in page and ">&lt;0xE2&gt;</span>" in page


def test_render_dashboard_keeps_each_token_in_its_own_character_order():
    # A right-to-left letter next to "<0xD7>" would otherwise pull the bytes around.
    page = render_dashboard({3: make_report(3)}, make_overview(), "test")
    logit_style = page[page.index(".logit-tok {") :]
    assert "unicode-bidi: isolate-override" in logit_style[: logit_style.index("}")]
    assert re.search(r"\.tok \{[^}]*unicode-bidi: isolate;", page)


def test_render_dashboard_is_self_contained():
    page = render_dashboard(make_reports(), make_overview(), "test")
    assert "http" not in page
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=", page)
    assert page.count("<svg") == 1 + 4  # density, then one activation histogram per latent


def test_render_dashboard_without_reports_renders():
    page = render_dashboard({}, make_overview(density=np.zeros(4), n_components=4), None)
    assert "<title>skSAE dashboard</title>" in page
    assert "No latent to show" in page
    assert "No latent is active" in page


def test_render_dashboard_rejects_missing_overview_keys():
    overview = make_overview()
    del overview["l0"]
    with pytest.raises(
        ValueError, match=r"The 'overview' parameter of render_dashboard .* missing \['l0'\]"
    ):
        render_dashboard({}, overview, "test")


@pytest.mark.parametrize(
    ("args", "name"),
    [((None, {}, "t"), "reports"), (({}, [], "t"), "overview"), (({}, {}, 5), "title")],
)
def test_render_dashboard_rejects_arguments_of_the_wrong_type(args, name):
    with pytest.raises(ValueError, match=f"The '{name}' parameter of render_dashboard"):
        render_dashboard(*args)


def test_pick_latents_spreads_over_alive_densities():
    density = np.array([0.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01, 0.0, 0.001])
    picked = _pick_latents(density, 4)
    assert picked == [1, 2, 5, 9]  # two most frequent, then evenly spaced ranks
    assert _pick_latents(density, 4) == picked
    assert _pick_latents(density, 100) == [1, 2, 3, 4, 5, 6, 7, 9]


# ---------------------------------------------------------------------------------------
# write_dashboard on a tiny model


@pytest.fixture(scope="module")
def fitted_tiny(tmp_path_factory):
    from conftest import TEXTS, make_char_tokenizer, make_tiny_model

    from skSAE import ActivationExtractor, SparseAutoencoder

    folder = tmp_path_factory.mktemp("gpt2")
    make_tiny_model("gpt2").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    extractor = ActivationExtractor(str(folder), layer=1, context_size=16, device="cpu")
    # Distinct texts (each also reversed, same characters): with repeated texts, tied
    # top examples could come from either copy and change which rows are sampled.
    texts = TEXTS + [text[::-1] for text in TEXTS]
    sae = SparseAutoencoder(32, k=4, max_iter=2, batch_size=64, device="cpu", random_state=0)
    sae.fit(extractor.transform(texts))
    return sae, extractor, texts


def test_write_dashboard_writes_one_panel_per_picked_latent(fitted_tiny, tmp_path):
    sae, extractor, texts = fitted_tiny
    path = write_dashboard(sae, extractor, texts, tmp_path / "sub" / "d.html", n_latents=5, k=3)
    page = path.read_text(encoding="utf-8")
    assert path.exists() and page.startswith("<!DOCTYPE html>")
    assert len(re.findall(r'<section class="panel[ "]', page)) == 5
    assert "variance explained" in page


def test_write_dashboard_shows_requested_latents(fitted_tiny, tmp_path):
    sae, extractor, texts = fitted_tiny
    path = write_dashboard(
        sae, extractor, texts, tmp_path / "d.html", latents=[0, 7], loss_recovered=0.5
    )
    page = path.read_text(encoding="utf-8")
    assert re.findall(r'<section class="panel[^"]*" id="latent-(\d+)"', page) == ["0", "7"]
    assert '<div class="value">0.500</div>' in page


def count_reads(monkeypatch, extractor):
    """The texts of every `iter_batches` call (every run of the model over a corpus)."""
    reads = []
    original = type(extractor).iter_batches

    def counting(self, texts, *args, **kwargs):
        reads.append(list(texts))
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(extractor), "iter_batches", counting)
    return reads


def test_write_dashboard_runs_the_model_over_the_texts_once(fitted_tiny, tmp_path, monkeypatch):
    sae, extractor, texts = fitted_tiny
    reads = count_reads(monkeypatch, extractor)
    write_dashboard(sae, extractor, texts, tmp_path / "d.html", n_latents=5, k=3)
    # The overview's extraction also gives the examples and their windows.
    assert reads == [texts]


def test_write_dashboard_with_memory_reuses_the_cached_extraction(
    fitted_tiny, tmp_path, monkeypatch
):
    sae, extractor, texts = fitted_tiny
    cached = clone(extractor).set_params(memory=str(tmp_path / "memory"))
    cached.extract(texts)
    reads = count_reads(monkeypatch, cached)
    write_dashboard(sae, cached, texts, tmp_path / "d.html", n_latents=5, k=3)
    assert reads == []


def test_write_dashboard_shows_the_reports_of_top_activating_examples(
    fitted_tiny, tmp_path, monkeypatch
):
    from skSAE import dashboard
    from skSAE.interpret import top_activating_examples

    sae, extractor, texts = fitted_tiny
    shown = {}
    render = dashboard.render_dashboard

    def capture(reports, overview, title):
        shown.update(reports)
        return render(reports, overview, title)

    monkeypatch.setattr(dashboard, "render_dashboard", capture)
    write_dashboard(sae, extractor, texts, tmp_path / "d.html", latents=[0, 3, 7], k=3)
    expected = top_activating_examples(sae, extractor, texts, [0, 3, 7], k=3)
    assert list(shown) == list(expected)

    def where(examples):
        return [(texts[e.doc_index], e.position, e.tokens) for e in examples]

    for latent, report in expected.items():
        got = shown[latent]
        assert where(got.top) == where(report.top)
        for (label, examples), (got_label, got_examples) in zip(
            report.quantiles, got.quantiles, strict=True
        ):
            assert got_label == label and where(got_examples) == where(examples)
        for got_example, example in zip(got.top, report.top, strict=True):
            np.testing.assert_allclose(
                got_example.token_activations, example.token_activations, rtol=1e-5, atol=1e-6
            )
        assert got.density == report.density
        assert got.max_activation == pytest.approx(report.max_activation, rel=1e-5)
        assert got.histogram[0].sum() == report.histogram[0].sum()  # bin edges may differ
        assert got.promoted == report.promoted and got.suppressed == report.suppressed


def count_forwards(monkeypatch, extractor):
    """[calls, contexts] of the model's forward (a wrapper on the loaded model)."""
    model, _ = extractor.load()
    counts = [0, 0]
    forward = model.forward

    def counting(*args, **kwargs):
        counts[0] += 1
        counts[1] += len(kwargs["input_ids"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return counts


def test_write_dashboard_runs_each_forward_batch_once(fitted_tiny, tmp_path, monkeypatch):
    sae, extractor, texts = fitted_tiny
    counts = count_forwards(monkeypatch, extractor)
    extractor.extract(texts)
    one_pass = list(counts)
    counts[:] = [0, 0]
    write_dashboard(sae, extractor, texts, tmp_path / "d.html", n_latents=5, k=3)
    assert counts == one_pass  # every context of every text, once


def test_write_dashboard_overview_equals_the_metrics_of_the_whole_extraction(
    fitted_tiny, tmp_path, monkeypatch
):
    from conftest import code_statistics_slack

    from skSAE import dashboard
    from skSAE.metrics import dead_fraction, latent_density, mean_l0

    sae, extractor, texts = fitted_tiny
    shown = {}
    render = dashboard.render_dashboard

    def capture(reports, overview, title):
        shown.update(overview)
        return render(reports, overview, title)

    monkeypatch.setattr(dashboard, "render_dashboard", capture)
    write_dashboard(sae, extractor, texts, tmp_path / "d.html", n_latents=5, k=3)
    # What write_dashboard computed before, from the whole extraction and its codes. Its
    # pass encodes batches of contexts: a code at a cut may fall another way (slack).
    activations = extractor.extract(texts).activations
    codes = sae.transform(activations)
    slack = code_statistics_slack(sae, activations)
    assert shown["n_tokens"] == len(codes)
    assert shown["l0"] == pytest.approx(mean_l0(codes), rel=1e-12, abs=slack["l0"])
    assert abs(shown["silent_fraction"] - dead_fraction(codes)) <= slack["dead_fraction"]
    assert (np.abs(shown["density"] - latent_density(codes)) <= slack["density"]).all()
    assert shown["explained_variance"] == pytest.approx(
        sae.score(activations), rel=1e-6, abs=slack["explained_variance"]
    )
    assert shown["n_components"] == 32


def test_write_dashboard_never_holds_the_codes_of_the_corpus(fitted_tiny, tmp_path, monkeypatch):
    sae, extractor, texts = fitted_tiny
    encoded = []
    make_module = sae._inference_module

    def recording(device):
        module = make_module(device)
        encode = module.encode

        def encode_recorded(x_ND):
            encoded.append(len(x_ND))
            return encode(x_ND)

        module.encode = encode_recorded
        return module

    def refuse(*args, **kwargs):
        raise AssertionError("the codes of the whole corpus were computed")

    monkeypatch.setattr(sae, "_inference_module", recording)
    monkeypatch.setattr(sae, "transform", refuse)
    monkeypatch.setattr(sae, "score", refuse)
    largest = {}
    for copies in (1, 4):
        encoded.clear()
        write_dashboard(sae, extractor, texts * copies, tmp_path / "d.html", n_latents=5, k=3)
        largest[copies] = max(encoded)
        assert sum(encoded) == copies * len(extractor.extract(texts).activations)
    # The codes are made one forward batch at a time, however long the corpus.
    assert largest[4] == largest[1] <= extractor.context_size * extractor.batch_size


def test_write_dashboard_with_a_byte_level_tokenizer_shows_no_replacement_character(tmp_path):
    from conftest import BYTE_TEXTS, byte_level_extractor_and_sae

    texts = [text.replace("gold", "gold ☃") for text in BYTE_TEXTS[:6]]
    extractor, sae = byte_level_extractor_and_sae(texts)
    page = write_dashboard(sae, extractor, texts, tmp_path / "d.html", n_latents=16).read_text(
        encoding="utf-8"
    )
    assert "\ufffd" not in page
    assert "’" in page  # whole characters read as themselves


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"latents": [0, 32]},
            r"The 'latents' parameter of write_dashboard must be latent indices, ints in "
            r"\[0, 32\) \(n_components of the SAE\). Got 32 in \[0, 32\] instead.",
        ),
        ({"latents": [1.5]}, r"'latents' parameter of write_dashboard .* Got 1.5 in \[1.5\]"),
        ({"latents": "3"}, r"'latents' parameter of write_dashboard .* Got '3' instead"),
        (
            {"n_latents": 0},
            r"The 'n_latents' parameter of write_dashboard must be an int in the range "
            r"\[1, inf\). Got 0 instead.",
        ),
        ({"k": -1}, r"The 'k' parameter of write_dashboard must be .*\. Got -1 instead."),
        ({"loss_recovered": "high"}, r"'loss_recovered' parameter of write_dashboard"),
        ({"title": 3}, r"'title' parameter of write_dashboard"),
    ],
)
def test_write_dashboard_rejects_bad_arguments(fitted_tiny, tmp_path, kwargs, match):
    sae, extractor, texts = fitted_tiny
    with pytest.raises(ValueError, match=match):
        write_dashboard(sae, extractor, texts, tmp_path / "d.html", **kwargs)


def test_write_dashboard_rejects_a_single_text(fitted_tiny, tmp_path):
    sae, extractor, texts = fitted_tiny
    with pytest.raises(ValueError, match="'texts' parameter of write_dashboard"):
        write_dashboard(sae, extractor, texts[0], tmp_path / "d.html")


# ---------------------------------------------------------------------------------------
# A real browser


def run_chromium(tmp_path, *args):
    """Run headless Chromium with a throwaway profile; returns its stdout."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def dashboard_file(tmp_path):
    path = tmp_path / "dashboard.html"
    path.write_text(render_dashboard(make_reports(), make_overview(), "test"), encoding="utf-8")
    return path


def test_dashboard_renders_in_headless_chromium(tmp_path, dashboard_file):
    dom = run_chromium(tmp_path, "--dump-dom", dashboard_file.as_uri())
    assert 'data-ready="1"' in dom  # the script ran to its end
    assert "data-errors" not in dom
    assert re.search(r'<pre id="errors"></pre>', dom)
    assert len(re.findall(r'<section class="panel[ "]', dom)) == 4
    assert re.search(r'<section class="panel active" id="latent-3"', dom)
    assert re.search(r'<span class="tok mark"[^>]*> brown</span>', dom)
    # The hostile token is a text node shown literally, not an element.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script>alert" not in dom
    assert dom.count("<script") == 1


def test_dashboard_hash_selects_panel_in_headless_chromium(tmp_path, dashboard_file):
    dom = run_chromium(tmp_path, "--dump-dom", dashboard_file.as_uri() + "#latent-42")
    assert 'data-ready="1"' in dom and "data-errors" not in dom
    assert re.findall(r'<section class="panel active" id="latent-(\d+)"', dom) == ["42"]
    assert re.findall(r'<a class="latent-item active"[^>]*data-latent="(\d+)"', dom) == ["42"]


def test_dashboard_screenshot_in_headless_chromium(tmp_path, dashboard_file):
    png = tmp_path / "dashboard.png"
    run_chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,900", dashboard_file.as_uri())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
