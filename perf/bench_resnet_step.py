"""One quickstart training step with channels-last ResNets against contiguous (NCHW) ones.

The quickstart's model (a `resnet_small` per view, a SALAD head per view, InfoNCE, AdamW)
on one batch of random images at the registry's sizes (ground 32 x 128, aerial 64 x 64),
forward + backward + optimiser step. `ResNet` keeps its weights and inputs channels-last;
the baseline, measured in the same run with the same weights, runs the same timm modules
on contiguous (NCHW) weights and inputs. Timed in CPU time (the steadier figure on a
shared machine), median of `--repeats` steps, alternating the two layouts.

    .venv/bin/python perf/bench_resnet_step.py [--threads 2] [--batch 32] [--repeats 10]
"""

from __future__ import annotations

import argparse
import resource
import time
import types

import torch

from gengeo_bench.features import Features
from gengeo_bench.model import CrossViewModel
from gengeo_bench.train import InfoNCE, TrainModule


def contiguous_forward(self, images: torch.Tensor) -> Features:
    """`ResNet.forward` without the channels-last conversion (the baseline)."""
    x = images
    for part in [*self.stem, *self.stages]:
        x = part(x)
    return Features(x, None)


def build(seed: int, channels_last: bool) -> tuple[TrainModule, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = CrossViewModel("resnet_small", "salad", share_backbone=False,
                           aggregator_params={"num_clusters": 8, "cluster_dim": 16,
                                              "token_dim": 32, "dropout": 0.1})
    if not channels_last:
        for backbone in (model.ground_backbone, model.aerial_backbone):
            backbone.model.to(memory_format=torch.contiguous_format)
            backbone.forward = types.MethodType(contiguous_forward, backbone)
    module = TrainModule(model, InfoNCE())
    return module, torch.optim.AdamW(module.parameters(), lr=1e-4)


def step(module, optimizer, batch) -> tuple[float, float, float]:
    """CPU seconds of the forward, the backward and the optimiser step."""
    t0 = time.process_time()
    loss = module(batch)
    t1 = time.process_time()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.process_time()
    optimizer.step()
    return t1 - t0, t2 - t1, time.process_time() - t2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = {"ground": torch.randn(args.batch, 3, 32, 128), "aerial": torch.randn(args.batch, 3, 64, 64)}
    runs = {name: build(0, name == "channels-last") for name in ("channels-last", "contiguous")}
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
    for _ in range(2):  # warm-up
        for module, opt in runs.values():
            step(module, opt, batch)
    for _ in range(args.repeats):
        for name, (module, opt) in runs.items():
            times[name].append(step(module, opt, batch))
    print(f"quickstart training step (resnet_small x2 + SALAD x2, batch {args.batch}), "
          f"torch {torch.__version__}, {args.threads} threads, CPU time, median of "
          f"{args.repeats}")
    medians = {}
    for name, rows in times.items():
        total = sorted(sum(r) for r in rows)[len(rows) // 2]
        parts = [sorted(r[i] for r in rows)[len(rows) // 2] for i in range(3)]
        medians[name] = total
        print(f"  {name:>13}: {1e3 * total:7.1f} ms/step (forward {1e3 * parts[0]:.1f}, "
              f"backward {1e3 * parts[1]:.1f}, optimiser {1e3 * parts[2]:.1f})")
    print(f"  contiguous / channels-last: {medians['contiguous'] / medians['channels-last']:.2f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS: {peak:.0f} MiB (both models in this process)")


if __name__ == "__main__":
    main()
