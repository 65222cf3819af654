"""CUDA paths; skipped (by conftest) when no CUDA device is present."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_same_codes

from skSAE import SparseAutoencoder, io
from skSAE._architectures import ARCHITECTURES

pytestmark = pytest.mark.gpu

FAST = dict(n_components=64, k=8, max_iter=3, batch_size=128, random_state=0)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_cpu_and_cuda_transform_agree(small_X, architecture):
    sae = SparseAutoencoder(device="cuda", architecture=architecture, **FAST).fit(small_X)
    on_cuda = sae.transform(small_X)
    on_cpu = sae.set_params(device="cpu").transform(small_X)
    # Other kernels: equal within float32 rounding, but a code at its cut may fall
    # either way (the check leaves such codes out).
    assert_same_codes(on_cuda, on_cpu, sae, small_X)


def test_cuda_tensor_input_stays_on_device(small_X):
    X = torch.from_numpy(small_X).cuda()
    sae = SparseAutoencoder(device="cuda", **FAST).fit(X)
    assert sae.transform(X).shape == (200, 64)
    assert sae.score(X) == pytest.approx(sae.score(small_X), abs=1e-4)


def test_cuda_model_loads_on_cpu_only_machine(tmp_path, small_X):
    sae = SparseAutoencoder(device="cuda", **FAST).fit(small_X)
    (tmp_path / "sae.pkl").write_bytes(pickle.dumps(sae))
    np.save(tmp_path / "X.npy", small_X)
    np.save(tmp_path / "codes.npy", sae.set_params(device="cpu").transform(small_X))
    script = (
        "import pickle, numpy as np, sys;"
        f"sae = pickle.loads(open({str(tmp_path / 'sae.pkl')!r}, 'rb').read());"
        "sae.set_params(device='auto');"
        f"codes = sae.transform(np.load({str(tmp_path / 'X.npy')!r}));"
        f"np.testing.assert_array_equal(codes, np.load({str(tmp_path / 'codes.npy')!r}))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)


def test_cuda_model_saved_by_io_loads_on_cpu_only_machine(tmp_path, small_X):
    sae = SparseAutoencoder(device="cuda", **FAST).fit(small_X)
    io.save(sae, tmp_path / "sae")
    np.save(tmp_path / "X.npy", small_X)
    np.save(tmp_path / "codes.npy", sae.set_params(device="cpu").transform(small_X))
    script = (
        "import numpy as np; from skSAE import io;"
        f"sae = io.load({str(tmp_path / 'sae')!r});"
        f"codes = sae.transform(np.load({str(tmp_path / 'X.npy')!r}));"
        f"np.testing.assert_array_equal(codes, np.load({str(tmp_path / 'codes.npy')!r}))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_training_loop_syncs_only_at_checks(monkeypatch, small_X, architecture):
    import warnings

    import skSAE._estimator as estimator_module

    monkeypatch.setattr(estimator_module, "_CHECK_EVERY", 1000)
    X = np.tile(small_X, (20, 1))  # 4000 rows: 125 steps of 32 rows in one pass
    sae = SparseAutoencoder(
        device="cuda",
        architecture=architecture,
        target_l0=8 if architecture in ("relu", "jumprelu", "gated") else None,
        n_components=64,
        k=8,
        max_iter=1,
        batch_size=32,
    )
    sae.fit(X[:64])  # warm-up: CUDA context, kernels
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sae.partial_fit(X)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # Setup and the end-of-pass summary may sync a few times; 125 steps must not.
    assert len(syncs) < 20, [str(w.message) for w in syncs[:5]]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_mixed_precision_on_cuda_trains_close_to_float32(architecture):
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(4096, 32)) * (rng.random((4096, 32)) < 0.2)).astype(np.float32)
    options = dict(architecture=architecture, n_components=128, k=8, max_iter=5, batch_size=512)
    full = SparseAutoencoder(device="cuda", random_state=0, **options).fit(X)
    mixed = SparseAutoencoder(device="cuda", mixed_precision=True, random_state=0, **options)
    mixed.fit(X)
    assert mixed.score(X) == pytest.approx(full.score(X), abs=0.05)
