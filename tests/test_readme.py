"""The README's code runs as written, so it cannot drift from the code.

Its Python blocks run in order in one namespace, in a scratch folder, with the few
names a reader brings (``X``, the texts) defined first and a tiny random model standing
in for SmolLM2 and for the README's placeholder paths. Its shell blocks (the main job,
the command-line workflow) run as written on the real model, behind ``slow``; the
``pip install`` steps are what ``.ci/run`` does, and are not rerun.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_char_tokenizer, make_sparse_dataset, make_tiny_model

from skSAE import ActivationExtractor, SparseAutoencoder, corpora, io

README = Path(__file__).resolve().parents[1] / "README.md"
TEXTS = [
    "the quick brown fox jumps over the lazy dog, again and again.",
    "sparse autoencoders find directions in activation space.",
    "to be, or not to be, that is the question.",
    "a latent is a direction; a dictionary is many of them.",
] * 3


def code_blocks(language):
    """The README's fenced blocks of one language, in order."""
    pattern = rf"^```{language}\n(.*?)^```"
    return re.findall(pattern, README.read_text(encoding="utf-8"), flags=re.M | re.S)


@pytest.fixture
def reader_folder(tmp_path, monkeypatch):
    """A scratch folder with a tiny model where the README names a model or an SAE."""
    model = tmp_path / "path" / "to" / "model"
    make_tiny_model("llama", n_layers=7, n_positions=128).save_pretrained(model)  # block 6
    make_char_tokenizer().save_pretrained(model)
    monkeypatch.setattr(corpora, "smollm2_path", lambda: str(model))
    extractor = ActivationExtractor(str(model), layer=1, device="cpu")
    sae = SparseAutoencoder(n_components=32, k=4, max_iter=2, random_state=0, device="cpu")
    sae.fit(extractor.transform(TEXTS))
    io.save(sae, tmp_path / "gemma-scope-or-any-sae", format="saelens", **extractor.hook_metadata())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_python_block_of_the_readme_runs(reader_folder):
    blocks = code_blocks("python")
    assert len(blocks) >= 4, "the README's Python blocks were not found"
    X, _ = make_sparse_dataset(n_samples=2000, n_features=16, n_true=48, p_active=0.1)
    namespace = {
        "X": X,
        "texts": TEXTS,
        "train_texts": TEXTS[:8],
        "test_texts": TEXTS[8:],
        "my_texts": TEXTS[:4],
    }
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README python block {number} fails:\n{block}") from exc
    # What the blocks say in their comments.
    assert namespace["search"].best_params_ == {"k": 32}
    assert namespace["codes"].shape == (2000, 256)
    assert (reader_folder / "acts.h5").exists() and (reader_folder / "for-saelens").is_dir()


# Shell commands of the README that CI runs itself (.ci/run): installs, the tests, the
# documentation build. Everything else is a skSAE command, run here.
CI_STEPS = ("pip ", "python -m pytest", "sphinx-build ")


def shell_commands():
    """The README's skSAE commands, in order (its other commands are CI's own steps)."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            for command in filter(None, (part.strip() for part in line.split("&&"))):
                if command.startswith(CI_STEPS):
                    continue
                assert command.startswith(("skSAE ", "python -m skSAE")), command
                commands.append(command)
    return commands


def test_the_readme_shell_commands_are_found():
    commands = shell_commands()
    assert commands[0] == "python -m skSAE"  # the README's first command: the main job
    for name in ("extract", "train", "evaluate", "dashboard", "convert"):
        assert any(command.startswith(f"skSAE {name} ") for command in commands), name
    ci = Path(__file__).resolve().parents[1].joinpath(".ci", "run").read_text()
    assert "sphinx-build -W" in ci and 'python -m pytest -m "not slow"' in ci


@pytest.mark.slow
def test_the_readme_shell_commands_run_on_smollm2(tmp_path):
    pytest.importorskip("gguf")
    try:
        corpora.smollm2_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    for command in shell_commands():
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        else:
            argv = [sys.executable, "-m", "skSAE", *argv[1:]]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f"{command}:\n{done.stderr[-3000:]}"
    # What the workflow says it writes.
    assert io.load(tmp_path / "sae").components_.shape == (4608, 576)
    assert io.detect_format(tmp_path / "sae-saelens") == "saelens"
    assert "<html" in (tmp_path / "dashboard.html").read_text(encoding="utf-8")
