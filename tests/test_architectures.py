"""The torch modules on their own: each fast path against a plain float64 reference."""

import copy

import numpy as np
import pytest
import torch

from skSAE._architectures import (
    ARCHITECTURES,
    BatchTopKModule,
    GatedModule,
    JumpReLUModule,
    MatryoshkaModule,
    ReLUModule,
    TopKModule,
    to_training_units,
    to_user_units,
    use_sparse_decode,
)

D, F, B = 6, 20, 16


def make_module(cls, seed=0, **options):
    """A float64 module with random (not initialised) weights, in training mode."""
    module = cls(D, F, **options).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
        module.constrain_weights()
    return module.train()


def batch(seed=1):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def loss_and_grads(module, x_BD, dead_latents=None):
    module.zero_grad()
    terms = module.loss(x_BD, dead_latents)
    terms.loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return terms, grads


@pytest.mark.parametrize("cls", [TopKModule, BatchTopKModule])
def test_sparse_decode_equals_dense_decode(cls):
    module = make_module(cls, k=3)
    dead_F = torch.zeros(F, dtype=torch.bool)
    dead_F[::3] = True
    module.aux_coefficient = 0.5
    module.sparse_decode = False
    dense, dense_grads = loss_and_grads(module, batch(), dead_F.nonzero().flatten())
    module.sparse_decode = True
    sparse, sparse_grads = loss_and_grads(module, batch(), dead_F.nonzero().flatten())
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.fires_F, dense.fires_F)
    assert sparse_grads.keys() == dense_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name])


def test_topk_loss_and_auxk_match_a_plain_reference():
    module = make_module(TopKModule, k=3)
    module.aux_coefficient = 0.25
    module.aux_k = 2
    dead_F = torch.zeros(F, dtype=torch.bool)
    dead_F[:5] = True
    x_BD = batch()
    terms = module.loss(x_BD, dead_F.nonzero().flatten())
    with torch.no_grad():
        pre = x_BD @ module.W_enc_DF + module.b_enc_F
        codes = torch.zeros_like(pre)
        for row in range(B):
            top = torch.argsort(pre[row], descending=True)[:3]
            codes[row, top] = torch.relu(pre[row, top])
        error = x_BD - (codes @ module.W_dec_FD + module.b_dec_D)
        aux_codes = torch.zeros_like(pre)
        for row in range(B):
            dead_pre = pre[row, :5]
            top = torch.argsort(dead_pre, descending=True)[:2]
            aux_codes[row, top] = torch.relu(dead_pre[top])
        aux = ((aux_codes @ module.W_dec_FD - error) ** 2).sum() / B
        expected = (error**2).sum() / B + 0.25 * aux
    torch.testing.assert_close(terms.loss, expected)
    torch.testing.assert_close(terms.fires_F, (codes > 0).sum(0).float())


def test_batchtopk_keeps_the_k_times_batch_largest_codes():
    module = make_module(BatchTopKModule, k=2)
    x_BD = batch()
    pre = (x_BD @ module.W_enc_DF + module.b_enc_F).detach()
    codes = module.activate(pre).detach()
    cutoff = torch.relu(pre).flatten().sort(descending=True).values[2 * B - 1]
    expected = torch.where(pre >= cutoff, torch.relu(pre), 0.0)
    torch.testing.assert_close(codes, expected)
    module.eval()
    torch.testing.assert_close(module.activate(pre), pre * (pre > module.threshold))


def test_matryoshka_loss_is_the_mean_of_the_prefix_losses():
    module = make_module(MatryoshkaModule, k=4, prefix_sizes=(5, 12, F))
    x_BD = batch()
    terms = module.loss(x_BD)
    with torch.no_grad():
        pre = x_BD @ module.W_enc_DF + module.b_enc_F
        module.n_threshold_updates.zero_()
        module.threshold.zero_()
        codes = module.activate(pre)
        losses = []
        for stop in (5, 12, F):
            x_hat = codes[:, :stop] @ module.W_dec_FD[:stop] + module.b_dec_D
            losses.append(((x_hat - x_BD) ** 2).sum() / B)
    torch.testing.assert_close(terms.loss, torch.stack(losses).mean())
    torch.testing.assert_close(terms.squared_error, losses[-1] * B)


def test_relu_penalty_is_l1_weighted_by_free_decoder_norms():
    module = make_module(ReLUModule, decoder_constraint="free")
    with torch.no_grad():
        module.W_dec_FD.mul_(torch.linspace(0.5, 2.0, F, dtype=torch.float64)[:, None])
    module.sparsity_coefficient.fill_(0.3)
    x_BD = batch()
    terms = module.loss(x_BD)
    with torch.no_grad():
        codes = torch.relu(x_BD @ module.W_enc_DF + module.b_enc_F)
        x_hat = codes @ module.W_dec_FD + module.b_dec_D
        penalty = 0.3 * (codes * module.W_dec_FD.norm(dim=1)).sum() / B
        expected = ((x_hat - x_BD) ** 2).sum() / B + penalty
    torch.testing.assert_close(terms.loss, expected)


def test_free_decoder_export_has_unit_rows_and_the_same_reconstruction():
    module = make_module(ReLUModule, decoder_constraint="free")
    with torch.no_grad():
        module.W_dec_FD.mul_(torch.linspace(0.1, 3.0, F, dtype=torch.float64)[:, None])
    x_BD = batch()
    state = module.export_state()
    torch.testing.assert_close(state["W_dec_FD"].norm(dim=1), torch.ones(F, dtype=torch.float64))
    codes = torch.relu(x_BD @ state["W_enc_DF"] + state["b_enc_F"])
    with torch.no_grad():
        expected = module.decode(module.encode(x_BD))
    torch.testing.assert_close(codes @ state["W_dec_FD"] + state["b_dec_D"], expected)


def test_jumprelu_pseudo_gradients_match_the_kernel_formulas():
    module = make_module(JumpReLUModule, bandwidth=0.8)
    with torch.no_grad():
        module.threshold_F.copy_(torch.rand(F, dtype=torch.float64))
    module.sparsity_coefficient.fill_(0.7)
    x_BD = batch()
    pre = (x_BD @ module.W_enc_DF + module.b_enc_F).detach().requires_grad_(True)
    codes = module.activate(pre)
    upstream = torch.randn(B, F, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (codes * upstream).sum().backward()
    theta = module.threshold_F.detach()
    window = ((pre.detach() - theta).abs() < 0.4).double()
    expected_theta = -(theta / 0.8) * (upstream * window).sum(0)
    torch.testing.assert_close(module.threshold_F.grad, expected_theta)
    torch.testing.assert_close(pre.grad, upstream * (pre.detach() > theta))
    module.threshold_F.grad = None
    module.penalty(codes, pre.detach()).backward()
    torch.testing.assert_close(module.threshold_F.grad, -0.7 * window.sum(0) / 0.8 / B)


def test_jumprelu_loss_matches_the_codes_and_penalty_separately():
    module = make_module(JumpReLUModule, bandwidth=0.8)
    with torch.no_grad():
        module.threshold_F.copy_(torch.rand(F, dtype=torch.float64))
    module.sparsity_coefficient.fill_(0.7)
    x_BD = batch()
    terms, grads = loss_and_grads(module, x_BD)
    module.zero_grad()
    pre = module.pre_activation(x_BD)
    codes = module.activate(pre)
    squared_error = ((module.decode(codes) - x_BD) ** 2).sum()
    (squared_error / B + module.penalty(codes, pre)).backward()
    torch.testing.assert_close(terms.loss, squared_error / B + module.penalty(codes, pre))
    torch.testing.assert_close(terms.squared_error, squared_error.detach())
    torch.testing.assert_close(terms.fires_F, (codes > 0).sum(0).to(terms.fires_F.dtype))
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad)


def test_jumprelu_training_keeps_no_float_batch_by_latents_tensor_but_the_codes():
    module = make_module(JumpReLUModule, bandwidth=0.8)
    saved = {}

    def pack(tensor):
        if tensor.shape == (B, F):
            saved[tensor.data_ptr()] = tensor.dtype
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module.loss(batch())
    float_tensors = [dtype for dtype in saved.values() if dtype.is_floating_point]
    # The codes (kept by the decoder's product); the backward pass needs only two masks.
    assert len(float_tensors) == 1
    assert sorted(map(str, saved.values())) == ["torch.bool", "torch.bool", "torch.float64"]


def test_jumprelu_start_at_l0_sets_the_requested_density():
    module = make_module(JumpReLUModule, bandwidth=0.1)
    x_BD = torch.randn(500, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    module.start_at_l0(x_BD, 3.0)
    module.eval()
    with torch.no_grad():
        l0 = (module.encode(x_BD) > 0).double().sum(1).mean()
    assert abs(float(l0) - 3.0) < 0.01
    assert float(module.sparsity_coefficient) == pytest.approx(
        4 * float(module.threshold_F[0].detach()) ** 2
    )


def test_gated_module_exports_the_jumprelu_it_equals():
    module = make_module(GatedModule)
    x_BD = batch()
    state = module.export_state()
    pre = x_BD @ state["W_enc_DF"] + state["b_enc_F"]
    with torch.no_grad():
        expected = module.encode(x_BD)
    torch.testing.assert_close(pre * (pre > state["threshold"]), expected)
    rebuilt = GatedModule(D, F).double()
    rebuilt.import_state(state)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode(x_BD), expected)


def test_gated_loss_matches_a_plain_reference():
    module = make_module(GatedModule)
    module.sparsity_coefficient.fill_(0.2)
    x_BD = batch()
    terms = module.loss(x_BD)
    with torch.no_grad():
        base = x_BD @ module.W_enc_DF
        gate = base + module.b_enc_F
        magnitude = base * module.r_mag_F.exp() + module.b_mag_F
        codes = (gate > 0) * torch.relu(magnitude)
        reconstruction = ((codes @ module.W_dec_FD + module.b_dec_D - x_BD) ** 2).sum() / B
        auxiliary = ((torch.relu(gate) @ module.W_dec_FD + module.b_dec_D - x_BD) ** 2).sum() / B
        sparsity = 0.2 * torch.relu(gate).sum() / B
    torch.testing.assert_close(terms.loss, reconstruction + sparsity + auxiliary)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_user_units_fold_is_exact(name):
    options = {
        "topk": {"k": 3},
        "batchtopk": {"k": 3},
        "matryoshka": {"k": 3, "prefix_sizes": (4, F)},
        "jumprelu": {"bandwidth": 0.1},
    }.get(name, {})
    module = make_module(ARCHITECTURES[name], **options).eval()
    if name in ("batchtopk", "matryoshka"):
        module.threshold.fill_(0.3)
    scale, mean_D = 0.37, torch.linspace(-2, 2, D, dtype=torch.float64)
    x_BD = batch() * 5 + 1
    with torch.no_grad():
        x_hat_trained = module.decode(module.encode((x_BD - mean_D) * scale)) / scale + mean_D
        user = to_user_units(module.export_state(), scale, mean_D)
        user_module = ARCHITECTURES[name](D, F, **options).double().eval()
        user_module.import_state(user)
        torch.testing.assert_close(user_module.decode(user_module.encode(x_BD)), x_hat_trained)
        round_trip = to_training_units(user, scale, mean_D)
    for key, value in module.export_state().items():
        torch.testing.assert_close(round_trip[key], value)


def test_sparse_decode_is_chosen_for_wide_dictionaries_on_cpu_only():
    cpu = torch.device("cpu")
    assert use_sparse_decode(TopKModule(8, 64 * 4, k=4), cpu)
    assert not use_sparse_decode(TopKModule(8, 64 * 4 - 1, k=4), cpu)
    assert not use_sparse_decode(MatryoshkaModule(8, 1024, k=4, prefix_sizes=(1024,)), cpu)
    assert not use_sparse_decode(TopKModule(8, 1024, k=4), torch.device("cuda"))


def test_fires_count_rows_per_latent():
    module = make_module(ReLUModule)
    x_BD = batch()
    terms = module.loss(x_BD)
    with torch.no_grad():
        codes = torch.relu(x_BD @ module.W_enc_DF + module.b_enc_F)
    np.testing.assert_array_equal(terms.fires_F.numpy(), (codes > 0).sum(0).numpy())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_gradients_are_the_row_weighted_sum_of_the_shares_gradients(name):
    # What a data-parallel fit rests on (`skSAE._distributed`): every loss term, AuxK
    # on dead latents included, is a mean over rows, so the gradient of a batch is its
    # shares' gradients weighted by their rows and summed, and the counts add up.
    # BatchTopK and Matryoshka cut the codes of the whole batch (`batch_cut`, as the
    # ranks' all-gather gives it) and feed its smallest kept code to the threshold.
    options = {
        "topk": {"k": 3},
        "batchtopk": {"k": 3},
        "matryoshka": {"k": 3, "prefix_sizes": (4, 9, F)},
        "jumprelu": {"bandwidth": 0.5},
    }.get(name, {})
    module = make_module(ARCHITECTURES[name], **options)
    module.sparsity_coefficient.fill_(0.2)
    module.aux_coefficient = 0.5  # AuxK where the architecture has it
    dead_latents = torch.arange(0, F, 3)
    x_BD = batch()
    start = copy.deepcopy(module)
    whole, whole_grads = loss_and_grads(module, x_BD, dead_latents)
    whole_state = module.state_dict()
    summed_grads, fires_F, squared_error = {}, torch.zeros(F), 0.0
    for share in (slice(0, 7), slice(7, B)):  # 7 and 9 rows
        module = copy.deepcopy(start)  # each rank starts the step from the same state
        if hasattr(module, "select_flat"):
            with torch.no_grad():
                flat = torch.relu(x_BD @ module.W_enc_DF + module.b_enc_F).flatten()
                cut = flat.topk(module.k * B).values[-1]
            module.batch_cut = lambda values_N, k, cut=cut: (cut, cut)
        terms, grads = loss_and_grads(module, x_BD[share], dead_latents)
        rows = x_BD[share].shape[0]
        for key, grad in grads.items():
            summed_grads[key] = summed_grads.get(key, 0) + grad * rows / B
        fires_F += terms.fires_F
        squared_error += terms.squared_error
        for key, value in module.state_dict().items():  # the threshold moved as in one
            torch.testing.assert_close(value, whole_state[key], msg=key)
    assert summed_grads.keys() == whole_grads.keys()
    for key, grad in whole_grads.items():
        torch.testing.assert_close(summed_grads[key], grad, msg=key)
    torch.testing.assert_close(fires_F, whole.fires_F)
    torch.testing.assert_close(squared_error, whole.squared_error)
