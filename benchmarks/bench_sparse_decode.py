"""Training step time of TopK/BatchTopK with the sparse decode against the dense one.

The sparse decode (``skSAE._architectures._sparse_decode``) reconstructs a batch by
gathering the k active decoder rows of each row (``embedding_bag``) instead of
multiplying the (B, F) codes by the (F, D) decoder; its backward pass touches only
those rows. This script times one training step (forward, backward, Adam step) of
the same module both ways, on the same batch, for a grid of widths and k, and prints
``dense / sparse`` (above 1: sparse is faster). `use_sparse_decode` picks the sparse
path on the CPU from ``n_components / k >= 64``; this table is where that number
comes from.

Before timing, each configuration is checked: the loss and every gradient of the
sparse path must equal the dense path's in float64 (maximum absolute difference
printed).

Run from the repository root::

    python benchmarks/bench_sparse_decode.py           # about 2 minutes on 2 CPU cores
    python benchmarks/bench_sparse_decode.py --quick   # smoke test
    python benchmarks/bench_sparse_decode.py --device cuda

Shape suffixes: B minibatch rows, D n_features, F n_components.
"""

import argparse
import os
import time

import torch

from skSAE._architectures import SPARSE_DECODE_MIN_RATIO, BatchTopKModule, TopKModule

# (D, F, k): F/k from 16 to 512 at three widths.
GRID = [
    (64, 256, 16),
    (64, 256, 4),
    (64, 512, 8),
    (64, 1024, 8),
    (256, 1024, 32),
    (256, 2048, 32),
    (256, 4096, 32),
    (512, 1024, 64),
    (512, 2048, 32),
    (512, 4096, 32),
    (576, 4608, 32),
    (512, 16384, 32),
]
QUICK_GRID = [(16, 64, 8), (16, 256, 4)]


def make_module(cls, n_features, n_components, k, device, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    module = cls(n_features, n_components, k=k)
    x_BD = torch.randn(512, n_features, generator=generator)
    module.initialize(generator, x_BD, x_BD.mean(dim=0))
    return module.to(device, dtype).train()


def max_gradient_difference(cls, n_features, n_components, k, device):
    """Largest |sparse - dense| over the loss and all gradients, in float64."""
    module = make_module(cls, n_features, n_components, k, device, torch.float64)
    x_BD = torch.randn(64, n_features, device=device, dtype=torch.float64)
    results = []
    for sparse in (False, True):
        module.sparse_decode = sparse
        module.zero_grad()
        terms = module.loss(x_BD)
        terms.loss.backward()
        results.append([terms.loss.detach()] + [p.grad.clone() for p in module.parameters()])
    return max(float((a - b).abs().max()) for a, b in zip(*results, strict=True))


def step_seconds(module, optimizer, x_BD, repeats):
    """Fastest of ``repeats`` timed training steps, after one untimed step."""
    times = []
    for repeat in range(repeats + 1):
        if x_BD.device.type == "cuda":
            torch.cuda.synchronize(x_BD.device)
        start = time.perf_counter()
        terms = module.loss(x_BD)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        if x_BD.device.type == "cuda":
            torch.cuda.synchronize(x_BD.device)
        if repeat:
            times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    grid = QUICK_GRID if args.quick else GRID
    batch_size = 64 if args.quick else args.batch_size
    print("skSAE sparse decode benchmark: one training step, dense / sparse (above 1: sparse wins)")
    print(
        f"torch {torch.__version__}, device {device}, torch.get_num_threads()="
        f"{torch.get_num_threads()}, batch {batch_size}, fastest of {args.repeats} steps, "
        f"load average {os.getloadavg()[0]:.2f} over {os.cpu_count()} CPUs"
    )
    print(f"skSAE uses the sparse decode on the CPU when F / k >= {SPARSE_DECODE_MIN_RATIO}")
    header = (
        f"{'module':<15} {'D':>5} {'F':>6} {'k':>4} {'F/k':>5} {'dense ms':>9} "
        f"{'sparse ms':>9} {'dense/sparse':>12} {'max |diff| f64':>15}"
    )
    print(header)
    print("-" * len(header))
    for cls in (TopKModule, BatchTopKModule):
        for n_features, n_components, k in grid:
            difference = max_gradient_difference(cls, n_features, n_components, k, device)
            module = make_module(cls, n_features, n_components, k, device)
            optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
            x_BD = torch.randn(batch_size, n_features, device=device)
            seconds = {}
            for sparse in (False, True, False, True):  # interleaved against drift
                module.sparse_decode = sparse
                fastest = step_seconds(module, optimizer, x_BD, args.repeats)
                seconds[sparse] = min(seconds.get(sparse, float("inf")), fastest)
            print(
                f"{cls.__name__:<15} {n_features:>5} {n_components:>6} {k:>4} "
                f"{n_components // k:>5} {seconds[False] * 1e3:>9.1f} "
                f"{seconds[True] * 1e3:>9.1f} {seconds[False] / seconds[True]:>12.2f} "
                f"{difference:>15.1e}"
            )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
