"""Smoke test of the benchmark scripts: they run and print their table."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_training_quick_prints_table():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_training.py"), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "ratio ours/hand" in result.stdout
    rows = [line.split()[:2] for line in result.stdout.splitlines()]
    assert ["cpu", "relu"] in rows and ["cpu", "topk"] in rows
