"""skSAE.io against SAELens itself: its own save_model and load_from_disk.

Runs only where `sae_lens` is installed (its own venv, see benchmarks/README.md):

    /work/venv-peers/bin/python -m pytest tests/test_io_saelens.py
"""

import numpy as np
import pytest
import torch

from skSAE import SparseAutoencoder, io
from skSAE._architectures import ARCHITECTURES

sae_lens = pytest.importorskip("sae_lens")

D, F, K = 16, 64, 6


def saelens_model(architecture, apply_b_dec):
    """A SAELens inference SAE with random weights and decoder rows of norms 0.5-2."""
    config_classes = {
        "standard": sae_lens.StandardSAEConfig,
        "topk": sae_lens.TopKSAEConfig,
        "jumprelu": sae_lens.JumpReLUSAEConfig,
        "gated": sae_lens.GatedSAEConfig,
    }
    extra = {"k": K, "rescale_acts_by_decoder_norm": True} if architecture == "topk" else {}
    config = config_classes[architecture](
        d_in=D, d_sae=F, apply_b_dec_to_input=apply_b_dec, **extra
    )
    config.metadata.hook_name = "blocks.3.hook_resid_post"
    sae = sae_lens.SAE.from_dict(config.to_dict())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        norm = torch.rand(F, 1, generator=generator) * 1.5 + 0.5
        sae.W_dec.mul_(norm / sae.W_dec.norm(dim=1, keepdim=True))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(F, generator=generator) * 0.3)
    return sae


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_saved_models_load_with_their_codes(architecture, apply_b_dec, tmp_path):
    original = saelens_model(architecture, apply_b_dec)
    original.save_model(tmp_path / "s")
    sae = io.load(tmp_path / "s")
    X = torch.randn(500, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes = original.encode(X).double().numpy()
        reconstruction = original.decode(original.encode(X)).double().numpy()
        norm = original.W_dec.norm(dim=1).double().numpy()
    if architecture == "topk":  # SAELens's TopK codes are already in unit-decoder units
        norm = np.ones(F)
    ours = sae.transform(X.numpy()).astype(np.float64)
    np.testing.assert_allclose(ours, codes * norm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        sae.inverse_transform(ours.astype(np.float32)), reconstruction, rtol=1e-5, atol=1e-4
    )
    assert sae.metadata_["hook_name"] == "blocks.3.hook_resid_post"


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_our_models_load_in_saelens_with_our_codes(architecture, tmp_path):
    X = np.random.default_rng(0).normal(size=(1000, D)).astype(np.float32) * 3 + 1
    params = {"k": K} if ARCHITECTURES[architecture].coefficient_name is None else {"target_l0": K}
    sae = SparseAutoencoder(
        n_components=F, architecture=architecture, max_iter=3, random_state=0, **params
    ).fit(X)
    io.save(sae, tmp_path / "s", format="saelens", hook_name="blocks.3.hook_resid_post")
    loaded = sae_lens.SAE.load_from_disk(tmp_path / "s")
    with torch.no_grad():
        codes = loaded.encode(torch.from_numpy(X)).numpy()
        reconstruction = loaded.decode(loaded.encode(torch.from_numpy(X))).numpy()
    ours = sae.transform(X)
    scale = np.abs(ours).max()
    np.testing.assert_allclose(codes, ours, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(reconstruction, sae.inverse_transform(ours), rtol=1e-5, atol=1e-4)
    assert loaded.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
