"""Training throughput of `SparseAutoencoder.fit` next to a hand-written torch loop.

The figure of merit is ``ours/hand``: tokens (rows) per second of
``SparseAutoencoder(...).fit(X)`` divided by those of a plain torch loop that
trains the same model (same maths, initialisation, Adam, learning rate, batch
size, unit-norm decoder constraint, input scaling and per-epoch row shuffle) on
the same data in the same process. It measures what the scikit-learn layer
costs: validation, the NumPy <-> torch hand-over, the running statistics, the
finiteness checks and the checkpoint copies. The target on CPU is >= 0.95.

Both timings cover the whole call, from a float32 NumPy array to trained
weights back in NumPy, initialisation included. Each path is warmed up once
(one epoch on ``2 * batch_size`` rows), then the two alternate, ``--repeats``
times each, and the table shows the medians.

Data: a correlated Gaussian, ``X = (Z * s) @ Q + 0.1`` with ``Z`` standard
normal, a power-law spectrum ``s_i = (i + 1) ** -0.5`` and a random orthogonal
``Q``, seeded, float32. The offset is small enough for the default
``l1_coefficient`` to leave live ReLU latents (at +0.5 they all die).

On CUDA the script also times a large square matmul in float32 (TF32 only if
the process default allows it; this script changes no setting) and in bfloat16
(``2 * n**3`` FLOPs each), and reports the achieved TFLOP/s of both loops
against those peaks, counting the matmuls each step runs with 2 FLOPs per
multiply-add: forward encode and decode (2 * 2BDF), backward dW_enc, dW_dec
and d(codes) (3 * 2BDF; ``x`` needs no gradient), so ``10 * B * D * F`` per
step, i.e. ``10 * D * F`` per token. Top-k, Adam and the decoder constraint
are not counted.

Run from the repository root::

    python benchmarks/bench_training.py           # default config, about 4 min on 2 cores
    python benchmarks/bench_training.py --quick   # tiny smoke test, a few seconds
    python benchmarks/bench_training.py --device cuda --rows 1048576 --epochs 2

Shape suffixes in the torch code: N rows of X, B minibatch rows, D n_features,
F n_components, K active latents (top-k).
"""

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from _shared import busy_cpu_seconds

import skSAE
import skSAE._architectures
from skSAE import SparseAutoencoder

# "topk" is what users get (on the CPU at 4096 / 32 latents: the sparse decode);
# "topk-dense" forces skSAE's dense decode, the hand loop's maths, so that its
# ratio is the pure cost of the layer.
ARCHITECTURES = ("relu", "topk", "topk-dense")
# Defaults of the estimator, used by both loops.
LEARNING_RATE = 1e-3
L1_COEFFICIENT = 1.0
SEED = 0
# Rows of X per device type when --rows is not given: about 4 minutes on 2 CPU cores.
DEFAULT_ROWS = {"cpu": 65536, "cuda": 2**20}
# FLOPs per token of the five (B, D) x (D, F)-sized matmuls of a step; see the docstring.
FLOPS_PER_TOKEN_PER_DF = 10
# Rows used for the sanity check of the trained models (outside the timings).
EVAL_ROWS = 4096


def make_data(n_rows, n_features, seed=SEED):
    """Correlated Gaussian float32 data of shape (n_rows, n_features); see the docstring."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n_features, n_features)))
    spectrum = (np.arange(n_features) + 1.0) ** -0.5
    Z = rng.standard_normal((n_rows, n_features), dtype=np.float32)
    Z *= spectrum.astype(np.float32)
    X = Z @ q.astype(np.float32)
    X += np.float32(0.1)
    return X


def fit_hand_loop(X, *, architecture, n_components, k, batch_size, epochs, device):
    """The baseline: a plain torch training loop of the same model, no checks, no stats.

    Returns the weights in the units of ``X`` (input scale folded into the biases).
    """
    generator = torch.Generator().manual_seed(SEED)
    X_ND = torch.from_numpy(X).to(device)
    n_rows, n_features = X_ND.shape
    # Scale the inputs so that their mean squared norm is n_features.
    scale = float((n_features / X_ND.square().sum(dim=1).mean()).sqrt())
    W_dec_FD = torch.randn(n_components, n_features, generator=generator)
    W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
    W_enc_DF = (W_dec_FD.T * (n_features / n_components) ** 0.5).contiguous()
    b_dec_D = X_ND.mean(dim=0).cpu() * scale
    b_enc_F = -(b_dec_D @ W_enc_DF)
    params = [p.to(device).requires_grad_() for p in (W_enc_DF, b_enc_F, W_dec_FD, b_dec_D)]
    W_enc_DF, b_enc_F, W_dec_FD, b_dec_D = params
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    for _ in range(epochs):
        order_N = torch.randperm(n_rows, generator=generator).to(device)
        for start in range(0, n_rows, batch_size):
            x_BD = X_ND[order_N[start : start + batch_size]] * scale
            pre_BF = x_BD @ W_enc_DF + b_enc_F
            if architecture.startswith("topk"):
                # sorted=False as in skSAE: this compares the layers, not the top-k kernel.
                values_BK, idx_BK = pre_BF.topk(k, dim=1, sorted=False)
                codes_BF = torch.zeros_like(pre_BF).scatter(1, idx_BK, values_BK.relu())
            else:
                codes_BF = pre_BF.relu()
            x_hat_BD = codes_BF @ W_dec_FD + b_dec_D
            loss = (x_hat_BD - x_BD).square().sum(dim=1).mean()
            if architecture == "relu":
                loss = loss + L1_COEFFICIENT * codes_BF.sum(dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                # Unit-norm decoder rows: drop the radial gradient, renormalise after the step.
                grad_FD = W_dec_FD.grad
                grad_FD -= (grad_FD * W_dec_FD).sum(dim=1, keepdim=True) * W_dec_FD
                optimizer.step()
                W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
    return {
        "W_enc": W_enc_DF.detach().cpu().numpy(),
        "b_enc": b_enc_F.detach().cpu().numpy() / scale,
        "W_dec": W_dec_FD.detach().cpu().numpy(),
        "b_dec": b_dec_D.detach().cpu().numpy() / scale,
    }


def fit_ours(X, *, architecture, n_components, k, batch_size, epochs, device):
    """`SparseAutoencoder.fit` with the same settings; returns its weights.

    The learning rate stays constant (``decay_fraction=0``), as in the hand loop.
    Dead-latent tracking runs as always; AuxK never triggers here (no latent is
    silent for a whole pass).
    """
    dense = architecture == "topk-dense"
    saved_ratio = skSAE._architectures.SPARSE_DECODE_MIN_RATIO
    if dense:
        skSAE._architectures.SPARSE_DECODE_MIN_RATIO = float("inf")
    try:
        sae = SparseAutoencoder(
            n_components=n_components,
            architecture="topk" if dense else architecture,
            k=k,
            l1_coefficient=L1_COEFFICIENT,
            learning_rate=LEARNING_RATE,
            decay_fraction=0.0,
            batch_size=batch_size,
            max_iter=epochs,
            device=str(device),
            random_state=SEED,
        ).fit(X)
    finally:
        skSAE._architectures.SPARSE_DECODE_MIN_RATIO = saved_ratio
    return {"W_enc": sae.W_enc_, "b_enc": sae.b_enc_, "W_dec": sae.components_, "b_dec": sae.b_dec_}


def explained_variance(X, weights, architecture, k, device):
    """1 - FVU of a trained model on ``X``: checks that both loops learned alike."""
    with torch.inference_mode():
        x_ND = torch.from_numpy(X).to(device)
        W = {name: torch.from_numpy(value).to(device) for name, value in weights.items()}
        pre_NF = x_ND @ W["W_enc"] + W["b_enc"]
        if architecture.startswith("topk"):
            values_NK, idx_NK = pre_NF.topk(k, dim=1, sorted=False)
            codes_NF = torch.zeros_like(pre_NF).scatter(1, idx_NK, values_NK.relu())
        else:
            codes_NF = pre_NF.relu()
        x_hat_ND = codes_NF @ W["W_dec"] + W["b_dec"]
        residual = (x_hat_ND - x_ND).double().square().sum()
        total = (x_ND.double() - x_ND.double().mean(dim=0)).square().sum()
        return float(1 - residual / total)


def timed(fit, X, device, **options):
    """Seconds of one full call of ``fit``: wall, our CPU, other processes' CPU; and weights.

    Our CPU seconds (all threads of this process) are a second opinion on a shared
    machine; the other processes' CPU seconds (None off Linux) say how shared it was.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, start_cpu, start_busy = time.perf_counter(), time.process_time(), busy_cpu_seconds()
    weights = fit(X, device=device, **options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu, busy = (
        time.perf_counter() - start,
        time.process_time() - start_cpu,
        busy_cpu_seconds(),
    )
    others = None if busy is None else max(0.0, busy - start_busy - cpu)
    return wall, cpu, others, weights


def matmul_peak_tflops(device, dtype, n=8192, iters=20):
    """TFLOP/s of an ``n x n`` by ``n x n`` matmul, timed with CUDA events after warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    return 2 * n**3 / seconds / 1e12


def run_config(X, device, architecture, args):
    """Warm up both loops, then time them alternately; returns a result dict."""
    options = dict(
        architecture=architecture,
        n_components=args.n_components,
        k=args.k,
        batch_size=args.batch_size,
    )
    warmup_X = X[: 2 * args.batch_size]
    fit_ours(warmup_X, epochs=1, device=device, **options)
    fit_hand_loop(warmup_X, epochs=1, device=device, **options)
    seconds = {"ours": [], "hand": []}
    cpu_seconds = {"ours": [], "hand": []}
    busy_fractions = []  # other processes' share of all CPUs during each timed fit
    weights = {}
    for repeat in range(args.repeats):
        # Alternate the order so that both loops share any drift in background load.
        order = ("ours", "hand") if repeat % 2 == 0 else ("hand", "ours")
        for name in order:
            fit = fit_ours if name == "ours" else fit_hand_loop
            elapsed, elapsed_cpu, others, weights[name] = timed(
                fit, X, device, epochs=args.epochs, **options
            )
            if others is not None:
                busy_fractions.append(others / (elapsed * os.cpu_count()))
            seconds[name].append(elapsed)
            cpu_seconds[name].append(elapsed_cpu)
    tokens = X.shape[0] * args.epochs
    eval_X = X[:EVAL_ROWS]
    return {
        "device": device.type,
        "architecture": architecture,
        "tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "busy": max(busy_fractions) if busy_fractions else float("nan"),
        "cpu_ratio": (
            statistics.median(cpu_seconds["hand"]) / statistics.median(cpu_seconds["ours"])
        ),
        "ours": tokens / statistics.median(seconds["ours"]),
        "hand": tokens / statistics.median(seconds["hand"]),
        "ev_ours": explained_variance(eval_X, weights["ours"], architecture, args.k, device),
        "ev_hand": explained_variance(eval_X, weights["hand"], architecture, args.k, device),
    }


def print_table(results, args):
    header = (
        f"{'device':<6} {'arch':<10} {'d':>5} {'n_comp':>6} {'batch':>5} {'rows':>8} "
        f"{'epochs':>6} {'tok/s ours':>11} {'tok/s hand':>11} {'ratio ours/hand':>15} "
        f"{'(CPU time)':>10} {'EV ours':>7} {'EV hand':>7} {'others':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['device']:<6} {r['architecture']:<10} {args.n_features:>5} "
            f"{args.n_components:>6} {args.batch_size:>5} {r['tokens'] // args.epochs:>8} "
            f"{args.epochs:>6} {r['ours']:>11.0f} {r['hand']:>11.0f} "
            f"{r['ours'] / r['hand']:>15.3f} {r['cpu_ratio']:>10.3f} "
            f"{r['ev_ours']:>7.3f} {r['ev_hand']:>7.3f} {r['busy']:>6.0%}"
        )
    print()
    for r in results:
        for kind in ("seconds", "cpu_seconds"):
            spread = {name: ", ".join(f"{s:.3g}" for s in times) for name, times in r[kind].items()}
            print(
                f"{kind.replace('_', ' ')} per fit, {r['device']}/{r['architecture']}: "
                f"ours [{spread['ours']}], hand [{spread['hand']}]"
            )


def print_gpu_report(results, device, args):
    """Achieved TFLOP/s of both loops against the card's measured matmul peaks."""
    peak_fp32 = matmul_peak_tflops(device, torch.float32)
    peak_bf16 = matmul_peak_tflops(device, torch.bfloat16)
    print()
    print(f"GPU: {torch.cuda.get_device_name(device)}")
    print(
        f"matmul peak (8192^3, CUDA events): float32 {peak_fp32:.1f} TFLOP/s "
        f"(float32_matmul_precision={torch.get_float32_matmul_precision()!r}, "
        f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}), bfloat16 {peak_bf16:.1f} TFLOP/s"
    )
    print(
        f"FLOPs counted: {FLOPS_PER_TOKEN_PER_DF} * d * n_components per token "
        "(encode + decode forward, dW_enc + dW_dec + d(codes) backward, 2 per multiply-add)"
    )
    for r in results:
        if r["device"] != "cuda":
            continue
        flops_per_token = FLOPS_PER_TOKEN_PER_DF * args.n_features * args.n_components
        for name in ("ours", "hand"):
            achieved = r[name] * flops_per_token / 1e12
            print(
                f"  {r['architecture']:<10} {name}: {achieved:6.1f} TFLOP/s = "
                f"{100 * achieved / peak_fp32:5.1f}% of float32 peak, "
                f"{100 * achieved / peak_bf16:5.1f}% of bfloat16 peak"
            )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-features", type=int, default=512)
    parser.add_argument("--n-components", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32, help="active latents for topk")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help=f"rows of X (default: {DEFAULT_ROWS['cpu']} on CPU, {DEFAULT_ROWS['cuda']} on CUDA)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--device",
        nargs="+",
        default=None,
        help="devices to benchmark (default: cpu, plus cuda when available)",
    )
    parser.add_argument(
        "--architecture", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.quick:
        args.n_features, args.n_components, args.k = 16, 64, 4
        args.batch_size, args.rows, args.epochs, args.repeats = 128, 512, 2, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    print("skSAE training benchmark: SparseAutoencoder.fit vs a hand-written torch loop")
    print(
        f"skSAE {skSAE.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"torch.get_num_threads()={torch.get_num_threads()}"
    )
    print(
        f"float32, lr={LEARNING_RATE}, l1_coefficient={L1_COEFFICIENT} (relu), k={args.k} (topk), "
        f"{args.repeats} repeats (median), alternating order, warm-up once per path"
    )
    print("data: correlated Gaussian (power-law spectrum (i+1)^-0.5, random rotation, +0.1)")
    print(
        "ratio ours/hand = tokens/s of fit over tokens/s of the hand loop (wall clock, median); "
        "(CPU time) = the same from process CPU seconds"
    )
    print(f"EV = variance explained on the first {EVAL_ROWS} rows (sanity check, not timed)")
    print(
        "others = the most that other processes used of all CPUs during one timed fit "
        "(above a few % the machine was shared: rerun)"
    )
    print(
        f"load average at start: {os.getloadavg()[0]:.2f} over {os.cpu_count()} CPUs "
        "(wall-clock figures are unreliable when other processes are busy)"
    )
    start = time.perf_counter()
    data = {}  # rows -> X, shared by the devices that use the same number of rows
    results = []
    for device_name in args.device:
        device = torch.device(device_name)
        n_rows = args.rows or DEFAULT_ROWS.get(device.type, DEFAULT_ROWS["cpu"])
        if n_rows not in data:
            data[n_rows] = make_data(n_rows, args.n_features)
        for architecture in args.architecture:
            results.append(run_config(data[n_rows], device, architecture, args))
    print_table(results, args)
    for device_name in args.device:
        device = torch.device(device_name)
        if device.type == "cuda":
            print_gpu_report(results, device, args)
    print(
        f"\ntotal {time.perf_counter() - start:.0f} s, load average at end: "
        f"{os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
