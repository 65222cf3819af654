"""The documentation site names every public object, and its configuration holds.

The site itself is built by CI (``sphinx-build -W``, see ``.ci/run``); these checks
run without Sphinx.
"""

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PUBLIC_MODULES = [
    "skSAE",
    "skSAE.io",
    "skSAE.cache",
    "skSAE.extraction",
    "skSAE.metrics",
    "skSAE.evaluation",
    "skSAE.interpret",
    "skSAE.dashboard",
    "skSAE.plotting",
    "skSAE.logging",
    "skSAE.corpora",
    "skSAE.cli",
]


def documented_names():
    """``{module: names}`` of api.rst: each autosummary entry and autodata under its module."""
    names, module = {}, None
    for line in (DOCS / "api.rst").read_text(encoding="utf-8").splitlines():
        current = re.match(r"\.\. currentmodule:: (\S+)", line)
        if current:
            module = current.group(1)
            continue
        entry = re.match(r"   ([A-Za-z_][\w]*)$", line) or re.match(r"\.\. autodata:: (\w+)", line)
        if entry and module:
            names.setdefault(module, set()).add(entry.group(1))
    return names


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_reference(module_name):
    module = importlib.import_module(module_name)
    public = set(module.__all__) - {"__version__", "io"}  # a string and a module
    documented = documented_names().get(module_name, set())
    assert public - documented == set(), f"{module_name}: not in docs/api.rst"
    assert documented - public == set(), f"{module_name}: in docs/api.rst, not in __all__"


def test_every_documented_module_is_checked():
    assert set(documented_names()) == set(PUBLIC_MODULES)


def test_the_gallery_runs_every_numbered_example_with_small_arguments():
    import sys

    sys.path.insert(0, str(DOCS))
    try:
        import gallery_args
    finally:
        sys.path.remove(str(DOCS))
    examples = sorted(path.name for path in (DOCS.parent / "examples").glob("[0-9][0-9]_*.py"))
    assert examples == sorted(gallery_args.GALLERY_ARGS)
    assert [path[:2] for path in examples] == [f"{i:02d}" for i in range(1, len(examples) + 1)]
    for name in examples:  # each is a gallery page: an rst title in its docstring
        lines = (DOCS.parent / "examples" / name).read_text(encoding="utf-8").splitlines()
        assert lines[1] == "=" * (len(lines[0]) - 3), name
