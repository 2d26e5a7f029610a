"""Time SALAD forward + backward: our implementation against the straightforward form.

SALAD: Izquierdo, Civera, "Optimal Transport Aggregation for Visual Place Recognition",
CVPR 2024. Sizes default to DINOv2-B/14 on 322 x 322 inputs: batch 32, 768 channels,
23 x 23 patches, a class token, 64 clusters x 128 dims + a 256-dim token (8448-D).

"Straightforward" is the same math written as the paper's code writes it: the plan P
`[B, m, n]` and the features f `[B, l, n]` are both repeated to `[B, l, m, n]`,
multiplied and summed over n. Ours computes the same sum as one batched matmul. Both use
the very same module (weights), in train mode (dropout 0.3), with gradients flowing to the
weights and to the input features (the backbone's last blocks train).

The GEMM floor: SALAD's step is mostly its MLPs' matrix products (forward, and backward
to the weights and to the input features): `mlp_flops` counts them, and the machine's
sgemm rate, measured in this run on the first layer's shape with the same threads,
turns them into the least time a step can take. Ours is printed as a multiple of it.

Each implementation runs in its own child process, so its peak memory is its own:
- cuda: `torch.cuda.max_memory_allocated` minus the allocation before the first warm-up
  (the tensors of the step: activations, gradients, temporaries);
- cpu: the rise of the process's peak resident set size (`getrusage` ru_maxrss) over its
  peak after building the model and inputs. This counts what the allocator really took
  from the OS for the step, allocator slack included.

    python perf/bench_salad.py                 # CPU defaults, well under 2 minutes
    python perf/bench_salad.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gengeo_bench.aggregators.salad import SALAD
from gengeo_bench.features import Features

IMPLEMENTATIONS = ("ours", "straightforward")


def straightforward(model: SALAD, features: Features) -> torch.Tensor:
    """SALAD with a dustbin, in the repeat/unsqueeze form, using `model`'s weights."""
    x, t = features.patches, features.global_token
    f = model.cluster_features(x).flatten(2)
    s = model.score(x).flatten(2)
    t = model.token_features(t)
    b, m, n = s.shape
    aug = torch.empty(b, m + 1, n, dtype=s.dtype, device=s.device)
    aug[:, :m] = s
    aug[:, m] = model.dust_bin
    norm = -math.log(n + m)
    log_a = torch.full((b, m + 1), norm, device=s.device)
    log_a[:, -1] += math.log(n - m)
    log_b = torch.full((b, n), norm, device=s.device)
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(model.sinkhorn_iters):
        u = log_a - torch.logsumexp(aug + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(aug + u.unsqueeze(2), dim=1)
    p = torch.exp(aug + u.unsqueeze(2) + v.unsqueeze(1) - norm)[:, :-1, :]
    p = p.unsqueeze(1).repeat(1, model.cluster_dim, 1, 1)  # [B, l, m, n]
    f = f.unsqueeze(2).repeat(1, 1, m, 1)  # [B, l, m, n]
    v_agg = F.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1)
    out = torch.cat([F.normalize(t, p=2, dim=-1), v_agg], dim=-1)
    return F.normalize(out, p=2, dim=-1)


def mlp_flops(batch: int, channels: int, patches: int, model: SALAD) -> float:
    """FLOPs of the MLPs' matrix products in one forward + backward step.

    A linear layer of M rows, K inputs and N outputs costs 2MKN forward and 4MKN backward
    (the gradients of its input and of its weight).
    """
    hidden = 512
    per_patch = (channels * hidden + hidden * model.cluster_dim
                 + channels * hidden + hidden * model.num_clusters)
    per_image = channels * hidden + hidden * model.token_dim
    return 6.0 * (batch * patches * per_patch + batch * per_image)


def sgemm_gflops(rows: int, inner: int, cols: int, device: torch.device, repeats: int = 5) -> float:
    """The machine's float32 GEMM rate on a [rows, inner] x [inner, cols] product."""
    a = torch.randn(rows, inner, device=device)
    b = torch.randn(inner, cols, device=device)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2.0 * rows * inner * cols / min(times) / 1e9


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> None:
    """Time one implementation; print a JSON line; save the first descriptor for a check."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SALAD(in_dim=args.channels).to(device).train()
    patches = torch.randn(args.batch, args.channels, args.grid, args.grid, device=device)
    cls = torch.randn(args.batch, args.channels, device=device)
    patches.requires_grad_(True)
    cls.requires_grad_(True)
    feats = Features(patches, cls)
    weights = torch.randn(args.batch, model.out_dim, device=device)  # a fixed, generic loss
    run = model if args.worker == "ours" else (lambda fs: straightforward(model, fs))

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        patches.grad = cls.grad = None
        out = run(feats)
        (out * weights).sum().backward()
        return out

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_bytes()

    torch.manual_seed(1)  # same dropout masks in both children: the outputs must agree
    first = step().detach()
    torch.save({"out": first.cpu(), "grad": patches.grad.detach().cpu()}, args.save)
    for _ in range(args.warmup - 1):
        step()
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    times.sort()
    print(
        json.dumps(
            {"ms": 1e3 * times[len(times) // 2], "min_ms": 1e3 * times[0], "peak_bytes": peak}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--grid", type=int, default=23, help="patches per side")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations (>= 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.worker:
        worker(args)
        return

    print(
        f"SALAD fwd+bwd, batch {args.batch}, {args.channels} channels, {args.grid}x{args.grid} "
        f"patches + cls, 64 clusters x 128 + 256 (train mode), {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.warmup} warm-up + {args.repeats} timed iterations (median)"
    )
    results, saved = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in IMPLEMENTATIONS:
            save = str(Path(tmp) / f"{name}.pt")
            cmd = [sys.executable, __file__, "--worker", name, "--save", save]
            for key in ("batch", "channels", "grid", "repeats", "warmup", "device"):
                cmd += [f"--{key}", str(getattr(args, key))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            saved[name] = torch.load(save, weights_only=True)

    measure = "peak CUDA allocation" if args.device == "cuda" else "peak RSS rise"
    for name in IMPLEMENTATIONS:
        r = results[name]
        print(
            f"  {name:>15}: {r['ms']:9.1f} ms/iter (min {r['min_ms']:.1f}), "
            f"{measure} {r['peak_bytes'] / 2**20:8.1f} MiB"
        )
    ours, ref = results["ours"], results["straightforward"]
    print(
        f"  straightforward / ours: time {ref['ms'] / ours['ms']:.2f}x, peak memory "
        f"{ref['peak_bytes'] / max(ours['peak_bytes'], 1):.2f}x"
    )
    device = torch.device(args.device)
    patches = args.grid * args.grid
    flops = mlp_flops(args.batch, args.channels, patches, SALAD(in_dim=args.channels))
    rate = sgemm_gflops(args.batch * patches, args.channels, 512, device)
    floor_ms = 1e3 * flops / (rate * 1e9)
    print(f"  GEMM floor: {flops / 1e9:.1f} GFLOP of MLP matrix products per step at "
          f"{rate:.0f} GFLOP/s (sgemm [{args.batch * patches}x{args.channels}] x "
          f"[{args.channels}x512], measured now) = {floor_ms:.0f} ms; ours = "
          f"{ours['ms'] / floor_ms:.2f}x the floor")
    d_out = (saved["ours"]["out"] - saved["straightforward"]["out"]).abs().max().item()
    d_grad = (saved["ours"]["grad"] - saved["straightforward"]["grad"]).abs().max().item()
    print(f"  same result: max |descriptor diff| {d_out:.2e}, max |input-grad diff| {d_grad:.2e}")


if __name__ == "__main__":
    main()
