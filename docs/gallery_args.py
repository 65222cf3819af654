"""The examples' command lines in the documentation's gallery (``docs/conf.py``).

Sphinx caches its configuration, which must then hold no function: sphinx-gallery takes
this one by name.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "_build" / "gallery_output"

# Smaller corpora than the examples' own defaults, so the whole gallery builds in a few
# minutes on 2 CPU cores; the README gives the figures of the full runs.
GALLERY_ARGS = {
    "01_fit_on_arrays.py": ["--tokens", "20000"],
    "02_grid_search.py": ["--chars", "12000", "--output", str(OUTPUT)],
    "03_interpret.py": ["--chars", "40000", "--output", str(OUTPUT)],
    "04_interop.py": ["--chars", "60000", "--output", str(OUTPUT / "smollm2-block6-saelens")],
    "05_evaluate.py": [
        "--train-chars", "80000", "--held-out-chars", "12000", "--per-class", "10",
        "--absorption-words", "300", "--output", str(OUTPUT / "evaluation.png"),
    ],
}  # fmt: skip


def reset_argv(gallery_conf, script_vars):
    """The arguments sphinx-gallery runs an example with."""
    return GALLERY_ARGS.get(Path(script_vars["src_file"]).name, [])
