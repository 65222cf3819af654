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
import warnings

import numpy as np
import pytest
from conftest import make_char_tokenizer, make_tiny_model

from skSAE import SparseAutoencoder

CHILD = textwrap.dedent(
    """
    import json, os, sys, warnings
    import numpy as np
    from skSAE import SparseAutoencoder

    params, out, die_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    rank = int(os.environ["RANK"])
    if die_at >= 0 and rank == 1:
        original = SparseAutoencoder._minibatch_step

        def step(self, run, stats, x_BD):
            if self.n_steps_ == die_at:
                os._exit(7)  # the rank dies without a word
            return original(self, run, stats, x_BD)

        SparseAutoencoder._minibatch_step = step
    warnings.simplefilter("ignore")
    X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    sae = SparseAutoencoder(**params).fit(X)
    np.savez(f"{out}/rank{rank}.npz", W_enc=sae.W_enc_, b_enc=sae.b_enc_,
             components=sae.components_, b_dec=sae.b_dec_, steps=sae.n_steps_,
             frequency=sae.latent_frequency_, dead=sae.dead_fraction_,
             coefficient=getattr(sae, "sparsity_coefficient_", np.nan))
    """
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, params, die_at=-1, timeout=300):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    port = free_port()
    ranks = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "SKSAE_DISTRIBUTED_TIMEOUT": "60",
        }
        ranks.append(
            subprocess.Popen(
                [sys.executable, str(script), json.dumps(params), str(tmp_path), str(die_at)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    started = time.monotonic()
    results = [rank.communicate(timeout=timeout) for rank in ranks]
    return [rank.returncode for rank in ranks], results, time.monotonic() - started


# 1000 rows in batches of 64: 16 steps a pass, the last of 40 rows.
CASES = {
    "topk": {"architecture": "topk", "k": 4},
    "relu-target_l0": {"architecture": "relu", "target_l0": 4},
    "batchtopk": {"architecture": "batchtopk", "k": 4},  # the global batch's top k * B
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_rank_fit_equals_one_process_fit(name, tmp_path):
    params = {"n_components": 48, "max_iter": 3, "batch_size": 64, "random_state": 0, **CASES[name]}
    codes, outputs, _ = run_ranks(tmp_path, params)
    assert codes == [0, 0], outputs
    rank0, rank1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(2))
    for key in rank0.files:  # every rank ends with the same fitted state
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
        alone = SparseAutoencoder(**params).fit(X)
    assert int(rank0["steps"]) == alone.n_steps_
    # Same batches, same steps: equal up to the order of float sums across ranks.
    for key, attribute in (
        ("W_enc", "W_enc_"),
        ("b_enc", "b_enc_"),
        ("components", "components_"),
        ("b_dec", "b_dec_"),
    ):
        np.testing.assert_allclose(
            rank0[key], getattr(alone, attribute), rtol=1e-4, atol=1e-5, err_msg=key
        )
    # Firing counts of the last pass: a code within float rounding of the cut may land
    # on either side when the sums run in another order (another BLAS, another split).
    np.testing.assert_allclose(rank0["frequency"], alone.latent_frequency_, atol=3 / 1000)
    if "target_l0" in params:
        assert float(rank0["coefficient"]) == pytest.approx(alone.sparsity_coefficient_, rel=1e-4)


def test_a_rank_that_dies_stops_the_other_with_a_clear_error(tmp_path):
    params = {"n_components": 48, "max_iter": 3, "batch_size": 64, "random_state": 0, "k": 4}
    codes, outputs, seconds = run_ranks(tmp_path, params, die_at=10)
    assert codes[1] == 7
    assert codes[0] != 0, outputs[0]
    assert "RankFailedError" in outputs[0][1] and "another rank" in outputs[0][1]
    assert seconds < 120  # not a hang


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
