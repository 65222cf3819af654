"""Data-parallel fits under torch.distributed (gloo, 2 processes on the CPU).

Each rank is a subprocess with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so skSAE starts the process group itself, as under ``torchrun``.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import make_char_tokenizer, make_sparse_dataset, make_tiny_model

from skSAE._architectures import ARCHITECTURES

CHILD = textwrap.dedent(
    """
    import json, os, sys, warnings
    import numpy as np
    from skSAE import SparseAutoencoder
    from skSAE._architectures import BatchTopKModule

    cases, data, out, die_at = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    rank = int(os.environ.get("RANK", "0"))
    tag = f"rank{rank}" if "RANK" in os.environ else "alone"
    if die_at >= 0 and rank == 1:
        original = SparseAutoencoder._minibatch_step

        def step(self, run, stats, x_BD):
            if self.n_steps_ == die_at:
                os._exit(7)  # the rank dies without a word
            return original(self, run, stats, x_BD)

        SparseAutoencoder._minibatch_step = step
    probe = {}
    original_check = SparseAutoencoder._check

    def check(self, run, window):
        if self.n_steps_ % 32 == 0:  # where AuxK and resampling read the dead latents
            probe["dead_at_checks"].append(int(run.tracker.dead_F().sum()))
        return original_check(self, run, window)

    SparseAutoencoder._check = check
    original_settle = BatchTopKModule.settle

    def settle(self, x_BD):
        probe["running_threshold"] = float(self.threshold)  # the training's, before settle
        return original_settle(self, x_BD)

    BatchTopKModule.settle = settle
    warnings.simplefilter("ignore")
    X = np.load(data)
    for name, params in cases.items():
        probe.update(dead_at_checks=[], running_threshold=np.nan)
        sae = SparseAutoencoder(**params).fit(X)
        np.savez(
            f"{out}/{name}-{tag}.npz", W_enc=sae.W_enc_, b_enc=sae.b_enc_,
            components=sae.components_, b_dec=sae.b_dec_,
            threshold=getattr(sae, "threshold_", np.nan), steps=sae.n_steps_,
            frequency=sae.latent_frequency_, dead=sae.dead_fraction_,
            coefficient=getattr(sae, "sparsity_coefficient_", np.nan),
            dead_at_checks=probe["dead_at_checks"],
            running_threshold=probe["running_threshold"],
        )
    """
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, cases, X, die_at=-1, alone=False, script=CHILD, timeout=300):
    """Fit ``cases`` on ``X`` (one array, or one per rank) in 2 ranks, and alone if asked.

    Returns the ranks' exit codes and (stdout, stderr), and the seconds they took.
    """
    (tmp_path / "child.py").write_text(script)
    port = free_port()
    processes = []
    for rank in [0, 1, *(["alone"] if alone else [])]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SKSAE_DISTRIBUTED_TIMEOUT": "60"}
        if rank != "alone":
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        data = tmp_path / f"X{rank}.npy"
        np.save(data, X[rank] if isinstance(X, list) else X)
        arguments = [json.dumps(cases), str(data), str(tmp_path), str(die_at)]
        processes.append(
            subprocess.Popen(
                [sys.executable, str(tmp_path / "child.py"), *arguments],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    started = time.monotonic()
    results = [process.communicate(timeout=timeout) for process in processes]
    return [process.returncode for process in processes], results, time.monotonic() - started


# Every architecture, on data where latents die: 1000 rows of 8 features, sparse
# combinations of 12 directions, for 48 latents at about 2 a row. A latent that has not
# fired in 256 rows is dead; the first check (step 32 of 64) finds some, and AuxK (topk,
# batchtopk, matryoshka) or resampling (relu) trains them for the 32 steps after it.
# Batches of 63 rows: shares of 31 and 32 rows, and a last batch of 55. The calibrated
# ones (relu, jumprelu, gated) steer to target_l0 from the global batch's L0.
COMMON = {"n_components": 48, "batch_size": 63, "max_iter": 4, "random_state": 0}
COMMON["dead_window"] = 256
CASES = {
    "relu": {"architecture": "relu", "target_l0": 2, "resample_dead": True},
    "topk": {"architecture": "topk", "k": 2},
    "batchtopk": {"architecture": "batchtopk", "k": 2},  # the global batch's top k * B
    "matryoshka": {"architecture": "matryoshka", "k": 2},
    "jumprelu": {"architecture": "jumprelu", "target_l0": 2},
    "gated": {"architecture": "gated", "target_l0": 2},
}
# With resampling or AuxK the dead latents are trained, and a latent dies whatever the
# variant: every variant of the package runs here.
WITH_DEAD_LATENT_TRAINING = {"relu", "topk", "batchtopk", "matryoshka"}


def test_every_architecture_is_tested():
    assert set(CASES) == set(ARCHITECTURES)


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """The fits of every case in 2 ranks and alone (one launch of 3 processes)."""
    tmp_path = tmp_path_factory.mktemp("fits")
    X, _ = make_sparse_dataset(n_samples=1000, n_features=8, n_true=12, p_active=2 / 12)
    cases = {name: {**COMMON, **params} for name, params in CASES.items()}
    codes, outputs, _ = run_ranks(tmp_path, cases, X, alone=True)
    assert codes == [0, 0, 0], [stderr[-3000:] for _, stderr in outputs]
    return {
        name: {tag: np.load(tmp_path / f"{name}-{tag}.npz") for tag in ("rank0", "rank1", "alone")}
        for name in CASES
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_rank_fit_equals_one_process_fit_where_latents_die(name, fits):
    rank0, rank1, alone = (fits[name][tag] for tag in ("rank0", "rank1", "alone"))
    for key in rank0.files:  # every rank ends with the same fitted state, bit for bit
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    # Latents died, and (with AuxK or resampling) were trained after the first check.
    assert alone["dead_at_checks"][0] > 0
    if name not in WITH_DEAD_LATENT_TRAINING:
        assert float(alone["dead"]) > 0
    assert int(rank0["steps"]) == int(alone["steps"]) == 64
    # The same batches and steps, every loss term and statistic over the global batch:
    # the ranks differ from one process only by the order of float32 sums (the
    # gradient of 2 shares summed against that of one batch), 3e-7 at most here.
    # 1e-4 leaves room for other BLAS kernels and is far below what a per-rank
    # statistic moves: BatchTopK's running threshold from each rank's own batch was
    # 2e-3 to 4e-3 off. (Over hundreds of steps a top-k choice can amplify the
    # rounding, as it does between two single-process runs one rounding apart: short
    # runs here.)
    for key in ("W_enc", "b_enc", "components", "b_dec", "threshold", "running_threshold"):
        np.testing.assert_allclose(rank0[key], alone[key], rtol=1e-4, atol=1e-5, err_msg=key)
    if not np.isnan(alone["coefficient"]):  # target_l0's calibration, from the global L0
        assert float(rank0["coefficient"]) == pytest.approx(float(alone["coefficient"]), rel=1e-4)
    # Counts: a code within float rounding of a top-k cut may land on either side.
    np.testing.assert_allclose(rank0["frequency"], alone["frequency"], atol=3 / 1000)
    np.testing.assert_allclose(rank0["dead_at_checks"], alone["dead_at_checks"], atol=1)
    assert abs(float(rank0["dead"]) - float(alone["dead"])) <= 1 / 48


def test_a_rank_that_dies_stops_the_other_with_a_clear_error(tmp_path):
    params = {"n_components": 48, "max_iter": 3, "batch_size": 64, "random_state": 0, "k": 4}
    X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    codes, outputs, seconds = run_ranks(tmp_path, {"topk": params}, X, die_at=10)
    assert codes[1] == 7
    assert codes[0] != 0, outputs[0]
    assert "RankFailedError" in outputs[0][1] and "another rank" in outputs[0][1]
    assert seconds < 120  # not a hang


DIFFERENT_DATA_CHILD = textwrap.dedent(
    """
    import os
    import numpy as np
    from skSAE import SparseAutoencoder

    rank = int(os.environ["RANK"])
    X = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    # 1000 rows against 999: 10 steps of 111 rows against 9; then shards of 500 rows.
    for name, rows in (("counts", X[: 1000 - rank]), ("rows", X[rank::2])):
        sae = SparseAutoencoder(n_components=16, k=2, max_iter=1, batch_size=111, random_state=0)
        try:
            sae.fit(rows)
            print(f"{name}: trained", flush=True)
        except ValueError as exc:
            print(f"{name}: ValueError: {exc}", flush=True)
    """
)


def test_ranks_given_different_data_all_raise_one_clear_error(tmp_path):
    codes, outputs, _ = run_ranks(tmp_path, {}, np.zeros((1, 1)), script=DIFFERENT_DATA_CHILD)
    # Both ranks raise, and go on (no abort, no "another rank stopped").
    assert codes == [0, 0], [stderr[-3000:] for _, stderr in outputs]
    for stdout, stderr in outputs:
        assert "RankFailedError" not in stderr
        assert (
            "counts: ValueError: The 2 ranks of this data-parallel fit were given different "
            "data: rank 0 has 1,000 rows, rank 1 has 999 rows: every rank must get the same "
            "number of rows."
        ) in stdout
        assert "rows: ValueError:" in stdout
        assert "the first rows of rank(s) 1 differ from rank 0's" in stdout


def test_main_job_runs_under_torchrun(tmp_path):
    # Llama: the main job's 128-token contexts fit its rotary positions.
    tiny_model_dir = tmp_path / "llama"
    make_tiny_model("llama").save_pretrained(tiny_model_dir)
    make_char_tokenizer().save_pretrained(tiny_model_dir)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "skSAE",
        "--model",
        str(tiny_model_dir),
        "--layer",
        "1",
        "--tokens",
        "3000",
        "--held-out-tokens",
        "400",
        "--k",
        "4",
        "--max-iter",
        "2",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "sae"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SKSAE_DISTRIBUTED_TIMEOUT": "120"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("cross-entropy with SAE") == 1  # rank 0 reports, once
    from skSAE import io

    sae = io.load(tmp_path / "sae")
    assert sae.metadata_["hook_name"] == "blocks.1.hook_resid_post"
