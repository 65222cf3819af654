"""Smoke test of the benchmark scripts: they run and print their table."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_training_quick_prints_table():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_training.py"), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,  # catches a hang; a loaded machine is slow, not broken
    )
    assert result.returncode == 0, result.stderr
    assert "ratio ours/hand" in result.stdout
    rows = [line.split()[:2] for line in result.stdout.splitlines()]
    assert ["cpu", "relu"] in rows and ["cpu", "topk"] in rows


def test_bench_frontier_quick_prints_tables(tmp_path):
    # --quick: tiny synthetic set and a tiny random Llama built on the fly (no model
    # package needed); about 5 s on 2 idle cores.
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_frontier.py"), "--quick", "--output", tmp_path],
        capture_output=True,
        text=True,
        timeout=600,  # catches a hang; a loaded machine is slow, not broken
    )
    assert result.returncode == 0, result.stderr
    assert "== synthetic" in result.stdout and "== real" in result.stdout
    knobs = {
        "reference": "l1_coefficient",
        "relu": "target_l0",
        "topk": "k",
        "batchtopk": "k",
        "matryoshka": "k",
        "jumprelu": "target_l0",
        "gated": "target_l0",
    }
    rows = [line.split()[:2] for line in result.stdout.splitlines()]
    for architecture, knob in knobs.items():
        # One table row per knob value, in both tables (synthetic, real).
        assert rows.count([architecture, knob]) >= 4, architecture
    assert "FAILED" not in result.stdout
    assert (tmp_path / "frontier_quick.json").exists()


def test_bench_sparse_decode_quick_checks_and_times_both_paths():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_sparse_decode.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,  # catches a hang; a loaded machine is slow, not broken
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("TopKModule")]
    assert len(rows) == 2
    # The float64 comparison of the two paths, last column.
    assert all(float(row[-1]) < 1e-10 for row in rows)


def test_bench_budget_quick_prints_tables(tmp_path):
    # --quick: one tiny (budget, width), batches 64, 4096 and "auto" x the old and the
    # new default learning rate; seconds.
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_budget.py"), "--quick", "--output", tmp_path],
        capture_output=True,
        text=True,
        timeout=600,  # catches a hang; a loaded machine is slow, not broken
    )
    assert result.returncode == 0, result.stderr
    assert "-- FVE/MMCS" in result.stdout and "-- >0.9/dead" in result.stdout
    assert "best by FVE" in result.stdout and "best by MMCS" in result.stdout
    assert "; defaults (batch 128, " in result.stdout  # 4000 tokens: the smallest batch
    cells = [
        line.split()[2:]
        for line in result.stdout.splitlines()
        if line.split() and line.split()[0] in {"64", "4096", "auto"}
    ]
    assert len(cells) == 6  # 3 batch sizes, in both tables
    for row in cells:
        assert len(row) == 2  # 2 learning rates
        for cell in row:
            first, second = (float(value) for value in cell.split("/"))
            assert -1.0 <= first <= 1.0 and 0.0 <= second <= 1.0
    saved = json.loads((tmp_path / "budget_quick.json").read_text())
    for point in saved["results"]:
        assert point["error"] is None
        assert math.isfinite(point["fve"]) and 0.0 <= point["mmcs"] <= 1.0


def test_bench_peers_quick_runs_without_the_peers():
    # In the project venv the peer libraries are absent: skSAE and the plain loop run,
    # and the script says which peers it did not find; a few seconds.
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_peers.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,  # catches a hang; a loaded machine is slow, not broken
    )
    assert result.returncode == 0, result.stderr
    assert "== equal tokens" in result.stdout and "== equal wall time" in result.stdout
    rows = [line.split()[:2] for line in result.stdout.splitlines()]
    # One row each per table: equal tokens (a grid of one point) and equal time.
    assert rows.count(["skSAE", "defaults"]) == 2
    assert rows.count(["plain", "batch"]) + rows.count(["plain", "*"]) == 2
    if not all(importlib.util.find_spec(name) for name in ("sae_lens", "dictionary_learning")):
        assert "peers not found" in result.stdout


def quick_output(script):
    """The stdout of ``benchmarks/<script> --quick``, which must succeed."""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,  # catches a hang; a loaded machine is slow, not broken
    ).stdout


def test_bench_streaming_quick_prints_the_ratio():
    out = quick_output("bench_streaming.py")
    assert "store / memory tokens/s:" in out
    assert out.count("peak RSS") == 1 and "store " in out and "memory " in out


def test_bench_dask_search_quick_prints_the_speed_up():
    pytest.importorskip("distributed")
    out = quick_output("bench_dask_search.py")
    assert "2 workers / 1 worker speed-up:" in out
    assert out.count("True") == 3  # the three backends give the same cv_results_


def test_bench_amortisation_quick_prints_every_algorithm():
    out = quick_output("bench_amortisation.py")
    rows = {
        line.split()[0]: line.split()[-5:]
        for line in out.splitlines()
        if line.split() and line.split()[0] in {"encoder", "omp", "lasso_lars", "threshold"}
    }
    assert list(rows) == ["encoder", "omp", "lasso_lars", "threshold"]
    for l0, fve, cosine, negative, seconds in rows.values():
        assert float(l0) > 0 and float(fve) <= 1.0 and -1.0 <= float(cosine) <= 1.0
        assert 0 <= float(negative.rstrip("%")) <= 100 and float(seconds) >= 0.0
    # The TopK encoder sits at its k and makes no negative code; OMP runs at that L0 and,
    # on this synthetic set (not on every data), reconstructs better.
    assert rows["encoder"][0] == rows["omp"][0] and rows["encoder"][3] == "0%"
    assert float(rows["omp"][1]) > float(rows["encoder"][1])
    assert "gap: " in out
