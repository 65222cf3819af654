"""The ``skSAE`` command line, driven as a user runs it: subprocesses on real files.

A tiny random Llama with a character tokenizer stands in for the model; the store, the
saved SAE, the JSON and the HTML page are real files, compared with what the Python
API makes of the same inputs.
"""

import contextlib
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_model, mount_tmpfs

from skSAE import ActivationExtractor, SparseAutoencoder, cli, corpora, io
from skSAE.evaluation import evaluate

WORDS = "the quick brown fox jumps over lazy dog sparse autoencoders find directions".split()
TRAIN_PARAMS = {"n_components": 32, "k": 4, "max_iter": 2, "random_state": 0, "device": "cpu"}


def skSAE(*args, cwd, check=True, timeout=300):
    """Run ``python -m skSAE *args`` in ``cwd``; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "skSAE", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def write_texts(folder, n_texts, n_words, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n_texts):
        text = " ".join(rng.choice(WORDS) for _ in range(n_words))
        (folder / f"{i:04d}.txt").write_text(text + ".", encoding="utf-8")
    return sorted(folder.glob("*.txt"))


@contextlib.contextmanager
def one_thread():
    """Torch on one thread, as the subprocesses run (OMP_NUM_THREADS=1): the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_all(paths):
    return [path.read_text(encoding="utf-8") for path in paths]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A model folder, training and held-out texts, and a store and SAE made by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    make_tiny_model("llama", n_positions=128).save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    write_texts(root / "train", 40, 60, seed=0)
    write_texts(root / "held_out", 6, 60, seed=1)
    (root / "sae.toml").write_text(
        'n_components = 32\nk = 8\nmax_iter = 2\nrandom_state = 0\ndevice = "cpu"\n'
    )
    extract = skSAE(
        "extract", "--model", "model", "--layer", "1", "--texts", "train",
        "--store", "acts.h5", "--device", "cpu", "--json", cwd=root,
    )  # fmt: skip
    # --k on the command line wins over the config file's k = 8.
    train = skSAE(
        "train", "--store", "acts.h5", "--config", "sae.toml", "--k", "4",
        "--output", "sae", "--json", cwd=root,
    )  # fmt: skip
    return root, json.loads(extract.stdout), json.loads(train.stdout), train


def test_extract_writes_the_rows_the_api_extracts(workdir):
    root, extracted, _, _ = workdir
    extractor = ActivationExtractor(str(root / "model"), layer=1, device="cpu")
    with one_thread():
        expected = extractor.transform(read_all(sorted((root / "train").glob("*.txt"))))
    with h5py.File(root / "acts.h5") as file:
        np.testing.assert_allclose(file["activations"][:], expected, rtol=1e-5, atol=1e-6)
        assert json.loads(file.attrs["hook_metadata"])["hook_name"] == "blocks.1.hook_resid_post"
    assert extracted["rows"] == expected.shape[0] and extracted["texts"] == 40
    assert extracted["status"] == "written"


def test_train_fits_the_model_the_api_fits_on_the_store(workdir):
    root, _, trained, _ = workdir
    sae = io.load(root / "sae")
    expected = SparseAutoencoder(**TRAIN_PARAMS)
    with h5py.File(root / "acts.h5") as file, one_thread():
        expected.fit(file["activations"])
    np.testing.assert_allclose(sae.components_, expected.components_, rtol=1e-4, atol=1e-5)
    assert sae.k == 4  # the flag over the config's 8
    assert trained["steps"] == expected.n_steps_ and trained["n_components"] == 32
    # The store's hook metadata travels with the model, so evaluate needs no --model.
    assert sae.metadata_["model_name"] == "model" and sae.metadata_["layer"] == 1


def test_train_shows_progress_unless_quiet(workdir, tmp_path):
    root, _, _, train = workdir
    assert "SparseAutoencoder(topk)" in train.stderr  # --json sends the bar to stderr
    quiet = skSAE(
        "train", "--store", root / "acts.h5", "--output", tmp_path / "sae", "--quiet",
        *[f"--{key.replace('_', '-')}={value}" for key, value in TRAIN_PARAMS.items()],
        cwd=root,
    )  # fmt: skip
    assert "step/s" not in quiet.stdout + quiet.stderr
    assert quiet.stdout.splitlines()[0].split() == ["output", str(tmp_path / "sae")]


def test_evaluate_prints_the_api_metrics(workdir):
    root, _, _, _ = workdir
    done = skSAE("evaluate", "sae", "--texts", "held_out", "--device", "cpu", "--json", cwd=root)
    report = json.loads(done.stdout)
    sae = io.load(root / "sae")
    extractor = ActivationExtractor.from_metadata(sae, model=str(root / "model"), device="cpu")
    with one_thread():
        expected = evaluate(sae, extractor, read_all(sorted((root / "held_out").glob("*.txt"))))
    for key in (
        "explained_variance",
        "mean_l0",
        "loss_recovered",
        "kl_divergence",
        "silent_fraction",
    ):
        assert report[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert report["texts"] == 6
    table = skSAE("evaluate", "sae", "--texts", "held_out", "--device", "cpu", "--quiet", cwd=root)
    rows = dict(line.split(None, 1) for line in table.stdout.splitlines())
    assert float(rows["explained_variance"]) == pytest.approx(expected["explained_variance"], 1e-3)


def test_dashboard_writes_the_page(workdir):
    root, _, _, _ = workdir
    done = skSAE(
        "dashboard", "sae", "--output", "page/dashboard.html", "--texts", "held_out",
        "--n-latents", "5", "--title", "tiny llama", "--device", "cpu", "--json", cwd=root,
    )  # fmt: skip
    page = (root / "page" / "dashboard.html").read_text(encoding="utf-8")
    assert json.loads(done.stdout)["output"] == "page/dashboard.html"
    assert page.count("<title>tiny llama</title>") == 1
    assert page.count('class="latent-item') == 5  # one entry per latent in the list


def test_convert_round_trips_through_saelens(workdir):
    root, _, _, _ = workdir
    skSAE("convert", "sae", "as_saelens", "--to", "saelens", cwd=root)
    assert io.detect_format(root / "as_saelens") == "saelens"
    done = skSAE("convert", "as_saelens", "back", "--json", cwd=root)
    assert json.loads(done.stdout)["source_format"] == "saelens"
    original, back = io.load(root / "sae"), io.load(root / "back")
    np.testing.assert_allclose(back.components_, original.components_, rtol=1e-6)
    refused = skSAE("convert", "as_saelens", "back", cwd=root, check=False)
    assert refused.returncode == 2 and "pass --overwrite" in refused.stderr
    assert "overwrite=True" not in refused.stderr  # the Python API's spelling


def test_a_bad_flag_is_a_usage_error(workdir):
    root, _, _, _ = workdir
    done = skSAE("train", "--store", "acts.h5", "--output", "x", "--kk", "3", cwd=root, check=False)
    assert done.returncode == 2
    assert "skSAE train: error: unrecognized arguments: --kk 3" in done.stderr
    assert not (root / "x").exists()


def test_a_bad_value_or_config_key_is_a_usage_error(workdir, tmp_path, capsys):
    root, _, _, _ = workdir
    base = ["train", "--store", str(root / "acts.h5"), "--output", str(tmp_path / "x")]
    assert cli.main([*base, "--architecture", "topkk"]) == 2
    assert "'architecture' parameter of SparseAutoencoder must be" in capsys.readouterr().err
    config = tmp_path / "bad.json"
    config.write_text('{"n_component": 32}')
    assert cli.main([*base, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'n_component' is not a SparseAutoencoder parameter; did you mean 'n_components'?" in err
    assert not (tmp_path / "x").exists()


def test_a_missing_store_fails_in_one_line(workdir):
    root, _, _, _ = workdir
    done = skSAE("train", "--store", "nowhere.h5", "--output", "x", cwd=root, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "skSAE train: error: no store at nowhere.h5; write one with "
        "`skSAE extract --store nowhere.h5`"
    )
    assert "Traceback" not in done.stderr
    debug = skSAE(
        "train", "--store", "nowhere.h5", "--output", "x", "--debug", cwd=root, check=False
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_bad_layer_fails_in_one_line_in_the_main_job_too(workdir):
    root, _, _, _ = workdir
    done = skSAE(
        "--model", "model", "--layer", "9", "--tokens", "200", "--held-out-tokens", "50",
        cwd=root, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "skSAE job: error: layer=9 is out of range" in done.stderr


def test_train_keeps_a_finished_model(workdir):
    root, _, _, _ = workdir
    before = (root / "sae" / "model.safetensors").read_bytes()
    done = skSAE("train", "--store", "acts.h5", "--output", "sae", cwd=root, check=False)
    assert done.returncode == 2 and "pass --overwrite" in done.stderr
    assert (root / "sae" / "model.safetensors").read_bytes() == before


def test_an_interrupted_extract_resumes_to_the_uninterrupted_store(workdir, tmp_path):
    root, _, _, _ = workdir
    write_texts(tmp_path / "many", 400, 40, seed=2)
    args = [
        "extract", "--model", root / "model", "--layer", "1", "--texts", "many",
        "--store", "acts.h5", "--device", "cpu", "--extract-batch-size", "1",
        "--max-norm-ratio", "none", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = subprocess.Popen(
        [sys.executable, "-m", "skSAE", *map(str, args)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    store = tmp_path / "acts.h5"
    deadline = time.monotonic() + 120
    while not store.exists() and running.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    running.send_signal(signal.SIGINT)
    _, err = running.communicate(timeout=120)
    assert running.returncode == 130, err[-2000:]
    with h5py.File(store) as file:
        done = int(file.attrs["documents_done"])
        assert not file.attrs["complete"] and 0 < done < 400
    assert f"acts.h5 holds {done} of 400 texts; run the same command again to resume" in err

    resumed = json.loads(skSAE(*args, "--json", cwd=tmp_path).stdout)
    assert resumed["status"] == f"resumed at text {done}"
    skSAE(*["whole.h5" if arg == "acts.h5" else arg for arg in args], cwd=tmp_path)
    with h5py.File(store) as a, h5py.File(tmp_path / "whole.h5") as b:
        assert a.attrs["complete"]
        for name in ("activations", "token_ids", "doc_index", "position"):
            np.testing.assert_array_equal(a[name][:], b[name][:])


def test_an_interrupted_train_saves_the_model_trained_so_far(workdir, tmp_path):
    root, extracted, _, _ = workdir
    log = tmp_path / "stderr.txt"
    args = [
        "train", "--store", root / "acts.h5", "--output", tmp_path / "sae", "--json",
        "--n-components", "32", "--k", "4", "--max-iter", "500", "--batch-size", "16",
        "--device", "cpu", "--random-state", "0",
    ]  # fmt: skip
    with open(log, "w") as stderr:
        running = subprocess.Popen(
            [sys.executable, "-m", "skSAE", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + 120
        while "SparseAutoencoder(topk)" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # some steps
        running.send_signal(signal.SIGINT)
        out, _ = running.communicate(timeout=120)
    err = log.read_text()
    assert running.returncode == 130, err[-2000:]
    assert "saved the model trained so far" in err and out == ""
    sae = io.load(tmp_path / "sae")
    assert 0 < sae.n_steps_ < 500 * -(-extracted["rows"] // 16)
    assert sae.n_steps_ % 32 == 0  # stopped at a progress check, where the loop expects it


def train_args(root, output, *extra):
    """``skSAE train`` on the workdir's store with TRAIN_PARAMS, quiet, into ``output``."""
    params = [f"--{key.replace('_', '-')}={value}" for key, value in TRAIN_PARAMS.items()]
    args = ["train", "--store", root / "acts.h5", "--output", output, "--quiet", *params, *extra]
    return [str(arg) for arg in args]


QUICK = ("--max-iter=1", "--batch-size=2048")  # 8 steps: a model to save, soon


@pytest.fixture
def no_work(monkeypatch):
    """Records a training or an extraction started (a refused --output must start none)."""
    started = []

    def recorder(name):
        def method(self, *args, **kwargs):
            started.append(name)
            raise AssertionError(f"{name} started")

        return method

    monkeypatch.setattr(SparseAutoencoder, "fit", recorder("training"))
    monkeypatch.setattr(ActivationExtractor, "transform", recorder("extraction"))
    return started


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nothing can be written in: a read-only tmpfs as root, else mode 0o555."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount_tmpfs(folder, "size=64k,ro")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 256 kB tmpfs filled to its last byte (skipped where none mounts)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mount_tmpfs(folder, "size=256k")
    try:
        with contextlib.suppress(OSError), open(folder / "filler", "wb", buffering=0) as file:
            while True:
                file.write(bytes(4096))
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("case", ["exists", "not an SAE", "a file", "under a file"])
def test_train_refuses_an_output_it_cannot_save_to_before_any_work(
    workdir, tmp_path, no_work, capsys, case
):
    root = workdir[0]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    output, extra, expected = {
        "exists": (root / "sae", [], "exists; pass --overwrite to replace it"),
        "not an SAE": (notes, ["--overwrite"], "holds files that are not an SAE"),
        "a file": (a_file, [], "is a file; it must name a folder"),
        "under a file": (a_file / "sae", [], f"{a_file} is a file, not a folder"),
    }[case]
    assert cli.main(train_args(root, output, *extra)) == 2
    err = capsys.readouterr().err
    assert f"skSAE train: error: --output {output}" in err and expected in err
    assert no_work == []
    assert (notes / "readme.txt").read_text() == "mine" and a_file.read_text() == "mine"


def test_train_refuses_an_output_before_extracting(workdir, tmp_path, no_work, capsys):
    root = workdir[0]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("mine")
    args = [
        "train", "--model", root / "model", "--layer", "1", "--texts", root / "held_out",
        "--output", tmp_path / "notes", "--overwrite", "--quiet",
    ]  # fmt: skip
    assert cli.main([str(arg) for arg in args]) == 2
    assert "holds files that are not an SAE" in capsys.readouterr().err
    assert no_work == []


def test_train_refuses_an_output_in_a_folder_it_cannot_write(
    workdir, read_only_folder, no_work, capsys
):
    root = workdir[0]
    output = read_only_folder / "sae"
    assert cli.main(train_args(root, output)) == 2
    err = capsys.readouterr().err
    assert f"--output {output}: cannot write in {read_only_folder}" in err
    assert no_work == []


def test_train_keeps_the_model_when_saving_fails(workdir, tmp_path, monkeypatch, capsys):
    root = workdir[0]
    real_save, saved_to = io.save, []

    def first_save_finds_the_disk_full(sae, path, *args, **kwargs):
        saved_to.append(Path(path))
        if len(saved_to) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(sae, path, *args, **kwargs)

    monkeypatch.setattr(io, "save", first_save_finds_the_disk_full)
    output = tmp_path / "sae"
    assert cli.main(train_args(root, output, *QUICK)) == 1
    err = capsys.readouterr().err
    kept = saved_to[-1]
    assert saved_to[0] == output and kept.parent.parent == tmp_path  # beside --output
    assert (
        f"could not save to {output} ([Errno 28] No space left on device); the trained model "
        f"is kept in {kept} instead"
    ) in err
    sae = io.load(kept)
    assert sae.n_iter_ == 1 and sae.metadata_["layer"] == 1
    assert not output.exists()


def test_train_keeps_the_model_when_the_disk_fills(
    workdir, tmp_path, full_disk, monkeypatch, capsys
):
    root = workdir[0]
    elsewhere = tmp_path / "system_tmp"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    output = full_disk / "sae"
    assert cli.main(train_args(root, output, *QUICK)) == 1
    err = capsys.readouterr().err
    assert f"could not save to {output} (" in err
    kept = Path(re.search(r"the trained model is kept in (\S+) instead", err).group(1))
    assert kept.parent.parent == elsewhere  # the full disk took nothing: the system's tmp
    assert io.load(kept).n_iter_ == 1
    assert sorted(path.name for path in full_disk.iterdir()) == ["filler"]


def test_train_keeps_the_model_when_a_checkpoint_cannot_be_written(
    workdir, tmp_path, full_disk, capsys
):
    # Room for the lock file beside the checkpoint, not for a checkpoint.
    filler = full_disk / "filler"
    os.truncate(filler, filler.stat().st_size - 16384)
    output = tmp_path / "sae"
    args = train_args(
        workdir[0], output, "--max-iter=2", "--batch-size=512",
        "--checkpoint-path", full_disk / "run.ckpt", "--checkpoint-every=16",
    )  # fmt: skip
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "could not write the checkpoint" in err and "the disk is full" in err
    steps = int(
        re.search(
            rf"The model trained so far \((\d+) steps\) is saved to {re.escape(str(output))}\.", err
        )[1]
    )
    assert steps >= 16 and io.load(output).n_steps_ == steps  # trained before the write, kept
    assert sorted(path.name for path in full_disk.iterdir()) == ["filler"]


def test_an_interrupted_train_resumes_with_the_same_command(workdir, tmp_path, monkeypatch, capsys):
    root = workdir[0]
    # 30 steps a pass; progress checks (where Ctrl-C stops) at steps 30, 32 and 60.
    args = train_args(
        root, tmp_path / "sae", "--batch-size=512",
        "--checkpoint-path", tmp_path / "run.ckpt", "--checkpoint-every=16",
    )  # fmt: skip
    log = cli._StoppingLogger.log

    def ctrl_c_at_step_32(self, metrics, step):
        if step >= 32:
            self._stop.requested = True  # what the SIGINT handler does
        log(self, metrics, step)

    with monkeypatch.context() as patch:
        patch.setattr(cli._StoppingLogger, "log", ctrl_c_at_step_32)
        assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert "saved the model trained so far (32 steps)" in err
    assert "run the same command again to continue from its checkpoint" in err
    # Another command (another checkpoint) may not replace the interrupted model.
    other = train_args(root, tmp_path / "sae", "--checkpoint-path", tmp_path / "other.ckpt")
    assert cli.main(other) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert io.load(tmp_path / "sae").n_steps_ == 32

    assert cli.main(args) == 0, capsys.readouterr().err  # the hint, as printed
    resumed = io.load(tmp_path / "sae")
    assert cli.main(train_args(root, tmp_path / "whole", "--batch-size=512")) == 0
    whole = io.load(tmp_path / "whole")
    assert resumed.n_steps_ == whole.n_steps_ == 60
    np.testing.assert_allclose(resumed.components_, whole.components_, rtol=1e-6, atol=1e-7)
    assert not (tmp_path / "run.ckpt").exists()  # the completed fit removed it


def test_a_texts_file_that_is_not_utf8_or_not_json_is_named_with_its_line(tmp_path, capsys):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ab"}\n{"text": "caf\xe9"}\n')
    # A JSON string may hold U+2028 unescaped: it ends no line of the file.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a\u2028b"}\n\n{"text": "cd"}\n{"text": "x",}\n', encoding="utf-8")
    for path, expected in (
        (latin, f"{latin}, line 2: not UTF-8 text (invalid continuation byte at byte 28)"),
        (bad, f"{bad}, line 4: not valid JSON (Expecting property name"),
    ):
        store = tmp_path / "x.h5"
        assert cli.main(["extract", "--texts", str(path), "--store", str(store), "--quiet"]) == 1
        assert expected in capsys.readouterr().err
        assert not store.exists()
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a\u2028b"}\n{"text": "cd"}\n', encoding="utf-8")
    assert corpora.read_texts([good]) == ["a\u2028b", "cd"]


def test_a_config_that_is_not_utf8_is_named(workdir, tmp_path, capsys):
    root = workdir[0]
    config = tmp_path / "sae.json"
    config.write_bytes(b'{"k": 4,\n "note": "caf\xe9"}')
    assert cli.main(train_args(root, tmp_path / "x", "--config", config)) == 2
    assert f"{config}, line 2: not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, flag, value",
    [
        ("dashboard", "--top", "0"),
        ("dashboard", "--n-latents", "-3"),
        ("dashboard", "--latents", "-1"),
        ("dashboard", "--latents", "3,99"),
        ("evaluate", "--per-class", "0"),
        ("evaluate", "--held-out-tokens", "0"),
        ("evaluate", "--held-out-tokens", "-5"),
        ("extract", "--tokens", "0"),
    ],
)
def test_a_bad_count_is_a_usage_error_naming_the_flag(
    workdir, tmp_path, capsys, command, flag, value
):
    root = workdir[0]
    args = {
        "dashboard": ["dashboard", root / "sae", "--output", tmp_path / "d.html"],
        "evaluate": ["evaluate", root / "sae", "--labelled", "shakespeare_play"],
        "extract": ["extract", "--store", tmp_path / "x.h5"],
    }[command]
    args += [
        "--model", root / "model", "--texts", root / "held_out", "--split", "held-out",
        "--device", "cpu", "--quiet", f"{flag}={value}",
    ]  # fmt: skip
    assert cli.main([str(arg) for arg in args]) == 2
    err = capsys.readouterr().err
    assert f"skSAE {command}: error: argument {flag}: expected" in err, err
    assert "parameter of" not in err  # the Python API's wording
    assert not (tmp_path / "d.html").exists() and not (tmp_path / "x.h5").exists()


def test_train_and_evaluate_name_dead_and_silent_latents_apart(workdir, tmp_path, capsys):
    root, _, trained, _ = workdir
    # train: the latents dead in training (sae.dead_fraction_).
    assert "dead_fraction" in trained and "silent_fraction" not in trained
    # evaluate and the dashboard: the latents never active on the texts they read.
    common = [
        "--model", root / "model", "--texts", root / "held_out", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    assert cli.main([str(arg) for arg in ["evaluate", root / "sae", *common, "--json"]]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 <= report["silent_fraction"] <= 1 and not [key for key in report if "dead" in key]
    page = tmp_path / "d.html"
    args = ["dashboard", root / "sae", "--output", page, "--n-latents", "2", "--top", "2", *common]
    assert cli.main([str(arg) for arg in args]) == 0
    text = page.read_text(encoding="utf-8")
    assert "silent latents" in text and "dead latents" not in text


def test_parse_value_reads_numbers_lists_and_words():
    assert cli.parse_value("4096") == 4096
    assert cli.parse_value("3e-4") == pytest.approx(3e-4)
    assert cli.parse_value("none") is None and cli.parse_value("false") is False
    assert cli.parse_value("[64, 256]") == [64, 256] == cli.parse_value("64,256")
    assert cli.parse_value("runs/ckpt.pt") == "runs/ckpt.pt"


def test_every_estimator_parameter_is_a_flag_with_help():
    parser = cli.build_parser().commands["train"]
    flags = {action.dest: action for action in parser._actions}
    for name in SparseAutoencoder().get_params():
        if name in ("verbose", "logger"):
            continue
        action = flags[f"param_{name}"]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert len(action.help) > 30, name  # the docstring's first sentence and the default


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "skSAE"
    assert script.exists(), "reinstall the package (pip install -e .) to get the skSAE script"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "extract" in done.stdout and "dashboard" in done.stdout
