"""Training from an HDF5 store on disk against training from memory: tokens/s and peak RSS.

Builds an HDF5 store (`skSAE.ActivationCache`'s layout: ``activations`` float16,
chunked) of SmolLM2-like activations: the real block-6 activations cached by
``bench_frontier.py`` / ``bench_peers.py`` when present (tiled, with small noise so no
two rows are equal), else a correlated Gaussian of the same width. Then, each in a
fresh subprocess so that its peak RSS is its own:

- ``store``: ``SparseAutoencoder(max_iter=1).fit(file["activations"])``: one pass
  streamed from disk (chunks in random order, rows shuffled within, the next chunk
  read in a thread while the current one trains);
- ``memory``: the same fit on the first ``--memory-rows`` rows loaded as a float32
  array (the baseline: the same code with no reads).

It prints tokens/s of each, their ratio (target >= 0.9), the peak RSS of each
process and of the store's data (a float32 copy of the whole store would need
``rows * 576 * 4`` bytes). Both fits use the same explicit batch size and learning
rate, so they make the same steps per row.

Run from the repository root::

    python benchmarks/bench_streaming.py                   # 4M rows x 576 (4.6 GB)
    python benchmarks/bench_streaming.py --rows 10000000   # 11.5 GB
    python benchmarks/bench_streaming.py --rows 20000000 --seconds 300  # 23 GB > RAM
    python benchmarks/bench_streaming.py --rows 10000000 --seconds 240 --drop-caches  # cold
    python benchmarks/bench_streaming.py --quick           # seconds
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
CACHED = HERE / "output" / "activations_SmolLM2_layer6_ctx128_ratio15.0.npz"
WIDTH = 576

CHILD = """
import json, resource, signal, sys, time, warnings
import h5py, numpy as np
from skSAE import SparseAutoencoder
path, mode = sys.argv[1], sys.argv[2]
memory_rows, batch, lr = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
limit = int(sys.argv[6])
warnings.simplefilter("ignore")

def stop(signum, frame):
    raise KeyboardInterrupt  # the fit keeps its steps (TrainingInterruptedWarning)

with h5py.File(path, "r") as file:
    data = file["activations"]
    X = data if mode == "store" else np.asarray(data[:memory_rows], dtype=np.float32)
    sae = SparseAutoencoder(k=32, max_iter=1, batch_size=batch, learning_rate=lr,
                            device="cpu", random_state=0)
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(limit)  # 0: no limit
    started = time.perf_counter()
    try:
        sae.fit(X)
    except KeyboardInterrupt:  # stopped before its first step: nothing kept
        pass
    seconds = time.perf_counter() - started
    signal.alarm(0)
    rows = min(X.shape[0], getattr(sae, "n_steps_", 0) * batch)
print(json.dumps({"rows": rows, "seconds": seconds, "tok_s": rows / seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "steps": getattr(sae, "n_steps_", 0)}))
"""


def source_rows():
    """Real SmolLM2 block-6 rows when cached, else a correlated Gaussian."""
    if CACHED.exists():
        with np.load(CACHED) as cached:
            return cached["activations"].astype(np.float32), "SmolLM2-135M block 6 (cached)"
    rng = np.random.default_rng(0)
    spectrum = 1 / np.sqrt(np.arange(1, WIDTH + 1))
    rotation = np.linalg.qr(rng.normal(size=(WIDTH, WIDTH)))[0]
    rows = (rng.normal(size=(65_536, WIDTH)) * spectrum) @ rotation
    return rows.astype(np.float32), "correlated Gaussian"


def build_store(path, n_rows, chunk_rows=16_384):
    base, what = source_rows()
    rng = np.random.default_rng(1)
    scale = float(base.std())
    with h5py.File(path, "w") as file:
        data = file.create_dataset(
            "activations",
            shape=(n_rows, base.shape[1]),
            dtype=np.float16,
            chunks=(min(chunk_rows, n_rows), base.shape[1]),
        )
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            rows = base[rng.integers(0, base.shape[0], stop - start)]
            rows = rows + rng.normal(scale=0.05 * scale, size=rows.shape).astype(np.float32)
            data[start:stop] = rows.astype(np.float16)
    return what


def run(path, mode, memory_rows, batch, learning_rate, limit=0):
    script = Path(tempfile.mkdtemp()) / "child.py"
    script.write_text(CHILD)
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            str(path),
            mode,
            str(memory_rows),
            str(batch),
            str(learning_rate),
            str(limit),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--memory-rows", type=int, default=500_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--store", default=None, help="where to build the store (a .h5 path)")
    parser.add_argument(
        "--seconds",
        type=int,
        default=0,
        help="stop the store's pass after this long (Ctrl-C keeps the steps; 0: the whole pass)",
    )
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="empty the page cache before the store's pass, so it reads from disk (needs root)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny store, for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.memory_rows, args.batch_size = 40_000, 20_000, 1024
    import torch

    print(
        f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} "
        f"CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )
    scratch = tempfile.TemporaryDirectory(prefix="bench_streaming_")
    path = Path(args.store) if args.store else Path(scratch.name) / "store.h5"
    started = time.perf_counter()
    what = build_store(path, args.rows)
    size_gb = path.stat().st_size / 1e9
    print(
        f"store: {args.rows} rows x {WIDTH} float16 of {what}, {size_gb:.2f} GB on disk "
        f"(float32 in memory: {args.rows * WIDTH * 4 / 1e9:.2f} GB), built in "
        f"{time.perf_counter() - started:.0f} s"
    )
    results = {"memory": run(path, "memory", args.memory_rows, args.batch_size, args.learning_rate)}
    if args.drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        print("page cache emptied before the store's pass: its reads come from disk")
    results |= {
        "store": run(
            path, "store", args.memory_rows, args.batch_size, args.learning_rate, args.seconds
        ),
    }
    print(
        f"\n{'source':<8} {'rows':>10} {'steps':>6} {'seconds':>8} {'tok/s':>8} {'peak RSS MB':>12}"
    )
    for mode, r in results.items():
        print(
            f"{mode:<8} {r['rows']:>10} {r['steps']:>6} {r['seconds']:>8.1f} "
            f"{r['tok_s']:>8.0f} {r['peak_rss_mb']:>12.0f}"
        )
    ratio = results["store"]["tok_s"] / results["memory"]["tok_s"]
    print(f"\nstore / memory tokens/s: {ratio:.3f} (target >= 0.9)")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    main()
