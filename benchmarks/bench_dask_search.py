"""A 6-candidate `GridSearchCV` on a Dask `LocalCluster`: 1 worker against 2.

The activations stay in an HDF5 store (`skSAE.ActivationCache.rows()`): each task
receives the path, not the rows, and reads its fold from the file. The same search
also runs with joblib's default backend (``n_jobs=2``) as a reference. Prints the wall
time of each (each Dask worker's torch gets ``cpu_count // workers`` threads), the
speed-up of 2 workers over 1, whether the three give the same
``cv_results_``, and the bytes of ``X`` in each task's pickle next to the bytes of
the array it stands for.

Run from the repository root (``pip install -e ".[distributed]"``)::

    python benchmarks/bench_dask_search.py            # 200k rows x 128
    python benchmarks/bench_dask_search.py --quick    # seconds
"""

import argparse
import os
import pickle
import platform
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
from joblib import parallel_backend
from sklearn.model_selection import GridSearchCV

from skSAE import ActivationCache, SparseAutoencoder


def search(n_components, max_iter):
    return GridSearchCV(
        SparseAutoencoder(n_components=n_components, max_iter=max_iter, random_state=0),
        {"k": [8, 16, 32], "learning_rate": [None, 1e-3]},
        cv=2,
        n_jobs=2,
    )


def main(argv=None):
    import distributed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--max-iter", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.width, args.max_iter = 4000, 16, 1
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at start; {args.rows} rows x {args.width}, 6 candidates "
        "x 2 folds"
    )
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "acts.h5"
        rng = np.random.default_rng(0)
        X = rng.normal(size=(args.rows, args.width)) @ rng.normal(size=(args.width, args.width))
        with h5py.File(path, "w") as file:
            file.create_dataset("activations", data=X.astype(np.float32), chunks=True)
        rows = ActivationCache(path).rows()
        results = {}
        started = time.perf_counter()
        results["joblib (loky), n_jobs=2"] = (
            search(8 * args.width, args.max_iter).fit(rows),
            time.perf_counter() - started,
        )
        for workers in (1, 2):
            # torch in each worker uses every core by default; share them out, as on a
            # cluster each worker has cores (or a GPU) of its own.
            threads = str(max(1, (os.cpu_count() or 1) // workers))
            with (
                distributed.LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
                ) as cluster,
                distributed.Client(cluster),
                parallel_backend("dask"),
            ):
                started = time.perf_counter()
                fitted = search(8 * args.width, args.max_iter).fit(rows)
                results[f"dask, {workers} worker{'s' * (workers > 1)}"] = (
                    fitted,
                    time.perf_counter() - started,
                )
        reference = results["joblib (loky), n_jobs=2"][0].cv_results_["mean_test_score"]
        print(f"\n{'backend':<26} {'wall s':>8} {'same cv_results_':>17}")
        for name, (fitted, seconds) in results.items():
            same = np.allclose(fitted.cv_results_["mean_test_score"], reference, rtol=1e-6)
            print(f"{name:<26} {seconds:>8.1f} {str(same):>17}")
        one, two = results["dask, 1 worker"][1], results["dask, 2 workers"][1]
        print(f"\n2 workers / 1 worker speed-up: {one / two:.2f}x")
        print(
            f"X in each task's pickle: {len(pickle.dumps(rows))} bytes (the path), against "
            f"{len(pickle.dumps(np.asarray(rows)))} bytes for the array"
        )
    return 0


if __name__ == "__main__":
    main()
