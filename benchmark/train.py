"""Training one Cell: contrastive learning of the two-view model, checkpoints, resume, DDP.

The recipe (docs/training.md): symmetric InfoNCE over the batch
(ground->aerial and aerial->ground) with a learnable logit scale initialised to
log(1/temperature) and label smoothing; AdamW with one learning rate for the backbone and
one for the head; linear warm-up then cosine decay per step; bf16 autocast on GPUs that
support it (fp16 + GradScaler otherwise); gradient clipping.

Batches are built by `BatchPlan`: `random`, `gps` (each anchor brings its nearest GPS
neighbours: hard negatives) or `similarity` (after each validation, nearest neighbours in
descriptor space). A batch never holds two pairs with the same aerial image.

A held-out part of the training split (`val_fraction`) is evaluated every epoch and
selects the checkpoint: the test split is never looked at during training.

Every epoch writes a full checkpoint atomically (model, optimiser, scheduler, scaler,
sampler and RNG states), so a run killed at any moment resumes from the last finished
epoch to the same final weights (on CPU, same seed) as an uninterrupted run. Checkpoints
are read with `torch.load(weights_only=True)`: data, never code.

Under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel, the
loss gathers descriptors from every rank (negatives from the global batch), and only
rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gengeo_bench.cache import atomic_write
from gengeo_bench.config import Cell
from gengeo_bench.datasets.base import EvalSplit, Pair
from gengeo_bench.errors import DataError, TrainingError
from gengeo_bench.evaluate import FeatureBank, autocast, backbone_key, evaluate_split
from gengeo_bench.features import Features
from gengeo_bench.imagedata import PairDataset, collate
from gengeo_bench.model import CrossViewModel
from gengeo_bench.progress import progress_bar
from gengeo_bench.protocols import Protocol
from gengeo_bench.transforms import Preprocess

log = logging.getLogger(__name__)

MetricLogger = Callable[[dict[str, float], int], None]


# --- building blocks ---------------------------------------------------------------------


def split_train_val(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out `fraction` of the training pairs (seeded) for validation."""
    if fraction <= 0 or len(pairs) < 4:
        return list(pairs), []
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = max(2, int(round(fraction * len(pairs))))
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [pairs[i] for i in train], [pairs[i] for i in val]


def one_to_one(pairs: list[Pair]) -> EvalSplit:
    return EvalSplit(
        query_ids=[p.id for p in pairs], queries=[p.ground for p in pairs],
        gallery_ids=[p.id for p in pairs], gallery=[p.aerial for p in pairs],
        gt=np.arange(len(pairs), dtype=np.int64),
    )


class InfoNCE(nn.Module):
    """Symmetric InfoNCE with a learnable logit scale and label smoothing.

    Under DDP, descriptors are gathered from every rank (with gradients), so each local
    query is contrasted against the global batch.
    """

    def __init__(self, temperature: float = 0.07, learnable: bool = True, label_smoothing: float = 0.1):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)),
                                        requires_grad=learnable)
        self.label_smoothing = label_smoothing

    def forward(self, ground: torch.Tensor, aerial: torch.Tensor) -> torch.Tensor:
        ground, aerial = ground.float(), aerial.float()
        offset = 0
        all_ground, all_aerial = ground, aerial
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch.distributed.nn.functional as dist_fn

            all_ground = torch.cat(dist_fn.all_gather(ground))
            all_aerial = torch.cat(dist_fn.all_gather(aerial))
            offset = dist.get_rank() * len(ground)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        labels = torch.arange(len(ground), device=ground.device) + offset
        g2a = scale * ground @ all_aerial.T
        a2g = scale * aerial @ all_ground.T
        return 0.5 * (F.cross_entropy(g2a, labels, label_smoothing=self.label_smoothing)
                      + F.cross_entropy(a2g, labels, label_smoothing=self.label_smoothing))


class TrainModule(nn.Module):
    """Model + loss in one module, so DDP synchronises the logit scale too."""

    def __init__(self, model: CrossViewModel, loss: InfoNCE):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if "ground_features" in batch:  # cached features of a frozen backbone
            g = self.model.aggregate(batch["ground_features"], "ground")
            a = self.model.aggregate(batch["aerial_features"], "aerial")
        else:
            g, a = self.model(batch["ground"], batch["aerial"])
        return self.loss(g, a)


class BatchPlan:
    """Batches of pair indices per epoch, deterministic from (seed, epoch).

    `neighbours[i]` (GPS or descriptor-space) are pulled into the batch of anchor `i` as
    hard negatives. No batch holds two pairs sharing an aerial image.
    """

    def __init__(self, aerial_keys: list[str], batch_size: int, seed: int, per_anchor: int = 3):
        self.aerial_keys = aerial_keys
        self.batch_size = batch_size
        self.seed = seed
        self.per_anchor = per_anchor
        self.neighbours: np.ndarray | None = None  # [N, k] int64

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.aerial_keys)
        rng = np.random.default_rng([self.seed, epoch, 7])
        order = rng.permutation(n)
        used = np.zeros(n, dtype=bool)
        batches: list[list[int]] = []
        current: list[int] = []
        keys: set[str] = set()
        deferred: list[int] = []

        def add(i: int) -> bool:
            if used[i] or self.aerial_keys[i] in keys:
                return False
            used[i] = True
            current.append(i)
            keys.add(self.aerial_keys[i])
            return True

        def flush() -> None:
            nonlocal current, keys
            if len(current) >= self.batch_size:
                batches.append(current[: self.batch_size])
                for i in current[self.batch_size:]:
                    used[i] = False
                    deferred.append(i)
                current, keys = [], set()

        for anchor in order.tolist():
            if used[anchor]:
                continue
            if not add(anchor):
                deferred.append(anchor)
                continue
            if self.neighbours is not None:
                taken = 0
                for j in self.neighbours[anchor].tolist():
                    if taken >= self.per_anchor:
                        break
                    if j >= 0 and add(j):
                        taken += 1
            flush()
            # Pairs that clashed with an earlier batch's aerial get a new chance.
            retry, deferred[:] = list(deferred), []
            for i in retry:
                if not used[i] and not add(i):
                    deferred.append(i)
            flush()
        return batches

    def state_dict(self) -> dict[str, Any]:
        neighbours = None if self.neighbours is None else torch.from_numpy(self.neighbours)
        return {"seed": self.seed, "neighbours": neighbours}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        neighbours = state.get("neighbours")
        self.neighbours = None if neighbours is None else neighbours.numpy()


def gps_neighbours(pairs: list[Pair], k: int = 8) -> np.ndarray | None:
    """Nearest pairs by location (scipy cKDTree; degrees scaled by cos(latitude))."""
    if not pairs or any(p.location is None for p in pairs):
        return None
    from scipy.spatial import cKDTree

    loc = np.asarray([p.location for p in pairs], dtype=np.float64)
    if np.abs(loc).max() <= 180:  # lat/lon degrees: make east-west distances comparable
        loc = np.stack([loc[:, 0], loc[:, 1] * np.cos(np.radians(loc[:, 0]))], axis=1)
    k = min(k + 1, len(pairs))
    _, idx = cKDTree(loc).query(loc, k=k)
    return np.asarray(idx, dtype=np.int64)[:, 1:]


def cosine_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --- the trainer -------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    epochs_done: int
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_path: Path | None = None


class Trainer:
    """Trains `model` on `train_pairs`, validating on `val_pairs`, in `workdir`."""

    def __init__(
        self,
        cell: Cell,
        model: CrossViewModel,
        train_pairs: list[Pair],
        val_pairs: list[Pair],
        ground_pre: Preprocess,
        aerial_pre: Preprocess,
        workdir: Path,
        device: torch.device,
        log_metrics: MetricLogger | None = None,
        feature_bank: FeatureBank | None = None,
        val_name: str = "val",
    ):
        self.cell, self.recipe = cell, cell.train
        self.model = model.to(device)
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.ground_pre, self.aerial_pre = ground_pre, aerial_pre
        self.workdir = Path(workdir)
        self.device = device
        self.log_metrics = log_metrics or (lambda metrics, step: None)
        self.val_name = val_name
        self.on_epoch: Callable[[dict[str, Any]], None] | None = None
        self.rank, self.world = distributed()
        self.loss = InfoNCE(self.recipe.temperature, self.recipe.learn_temperature,
                            self.recipe.label_smoothing).to(device)
        self.module: nn.Module = TrainModule(self.model, self.loss)
        if self.world > 1:
            self.module = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None)

        # Cached backbone features: only when nothing in the backbone trains and the
        # inputs are the same every epoch (no augmentation), and not under DDP.
        self.cached = None
        if (feature_bank is not None and model.backbone_is_frozen and not self.recipe.augment
                and self.world == 1):
            self.cached = self._cached_train_features(feature_bank)

        self.plan = BatchPlan([str(p.aerial) for p in train_pairs],
                              self.recipe.batch_size * self.world, cell.seed)
        if self.recipe.sampler in ("gps", "similarity"):
            self.plan.neighbours = gps_neighbours(train_pairs)
            if self.plan.neighbours is None and self.recipe.sampler == "gps":
                log.warning("sampler 'gps': the training pairs have no locations; batches are random")
        self.steps_per_epoch = len(self.plan.batches(0))
        if self.recipe.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.recipe.steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"training split has {len(train_pairs)} usable pairs, fewer than one batch of "
                f"{self.recipe.batch_size * self.world}: lower train.batch_size."
            )
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        param_groups = []
        for params, lr in ((model.backbone_parameters(), self.recipe.lr),
                           (model.head_parameters() + loss_params, self.recipe.head_lr)):
            # No weight decay on norms, biases and scalars (logit scale, GeM p, dustbin).
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            if decay:
                param_groups.append({"params": decay, "lr": lr, "weight_decay": self.recipe.weight_decay})
            if no_decay:
                param_groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(param_groups)
        total = self.steps_per_epoch * max(1, self.recipe.epochs)
        warmup = int(self.recipe.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_schedule(warmup, total))
        use_fp16 = device.type == "cuda" and (self.recipe.amp == "fp16" or (
            self.recipe.amp == "auto" and not torch.cuda.is_bf16_supported()))
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)
        # decoded images are kept only in this process (a worker's copy lasts one epoch)
        cache_mb = self.recipe.image_cache_mb if self.recipe.num_workers == 0 else 0
        self.pair_data = PairDataset(train_pairs, ground_pre, aerial_pre, augment=self.recipe.augment,
                                     seed=cell.seed, cache_mb=cache_mb)

    # -- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.workdir / "checkpoint.pt"

    @property
    def best_path(self) -> Path:
        return self.workdir / "best.pt"

    def state_dict(self, epoch: int, best: dict[str, float], history: list[dict]) -> dict[str, Any]:
        return {
            "cell_id": self.cell.id,
            "cell_yaml": self.cell.to_yaml(),
            "epoch": epoch,
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.plan.state_dict(),
            "rng": rng_state(),
            "best": best,
            "history": history,
        }

    def save(self, path: Path, state: dict[str, Any]) -> None:
        if self.rank == 0:
            atomic_write(path, lambda tmp: torch.save(state, tmp))

    def save_best(self, epoch: int, val_r1: float) -> None:
        """The weights selected on validation (what the test evaluation uses)."""
        self.save(self.best_path, {"cell_id": self.cell.id, "cell_yaml": self.cell.to_yaml(),
                                   "epoch": epoch, "model": self.model.state_dict(),
                                   "val_R1": val_r1})

    def load(self, path: Path) -> dict[str, Any]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("cell_id") != self.cell.id:
            raise TrainingError(
                f"{path} belongs to Cell {state.get('cell_id')}, not {self.cell.id}: delete "
                f"it or use another work directory."
            )
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.plan.load_state_dict(state["sampler"])
        return state

    # -- data

    def _cached_train_features(self, bank: FeatureBank) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for view, pre in (("ground", self.ground_pre), ("aerial", self.aerial_pre)):
            paths = [p.ground if view == "ground" else p.aerial for p in self.train_pairs]
            backbone, _ = self.model.branch(view)
            feats = bank.features(backbone, backbone_key(self.model, view), paths, pre, view,
                                  Protocol.parse("none"), self.device,
                                  self.cell.evaluate.batch_size, self.recipe.num_workers)
            if not feats["ok"].all():
                bad = [str(paths[i]) for i in np.flatnonzero(~feats["ok"].numpy())][:3]
                raise DataError(f"training images could not be read: {', '.join(bad)}")
            out[view] = feats
        return out

    def _batches(self, epoch: int):
        plan = self.plan.batches(epoch)[: self.steps_per_epoch]
        mine = [b[self.rank * self.recipe.batch_size:(self.rank + 1) * self.recipe.batch_size]
                for b in plan]
        if self.cached is not None:
            for indices in mine:
                idx = torch.as_tensor(indices)
                batch = {}
                for view in ("ground", "aerial"):
                    f = self.cached[view]
                    cls = f.get("cls")
                    batch[f"{view}_features"] = Features(
                        f["patches"][idx].float().to(self.device),
                        None if cls is None else cls[idx].float().to(self.device))
                yield batch
            return
        self.pair_data.set_epoch(epoch)
        loader = DataLoader(self.pair_data, batch_sampler=mine, num_workers=self.recipe.num_workers,
                            collate_fn=collate, pin_memory=self.device.type == "cuda")
        for batch in loader:
            yield {"ground": batch["ground"].to(self.device, non_blocking=True),
                   "aerial": batch["aerial"].to(self.device, non_blocking=True)}

    # -- loop

    def validate(self, epoch: int) -> float | None:
        if not self.val_pairs:
            return None
        result = evaluate_split(self.model, one_to_one(self.val_pairs), self.ground_pre,
                                self.aerial_pre, device=self.device,
                                batch_size=self.cell.evaluate.batch_size,
                                num_workers=self.cell.evaluate.num_workers, ks=(1,),
                                amp=self.recipe.amp)
        return result.metrics["R1"]

    def mine_similar(self) -> None:
        """Descriptor-space neighbours of every training pair: the next epoch's hard negatives."""
        from gengeo_bench.metrics import topk_search

        split = one_to_one(self.train_pairs)
        result = evaluate_split(self.model, split, self.ground_pre, self.aerial_pre,
                                device=self.device, batch_size=self.cell.evaluate.batch_size,
                                ks=(1,), amp=self.recipe.amp, return_descriptors=True)
        q, g = result.extra["query_descriptors"], result.extra["gallery_descriptors"]
        k = min(9, len(g))
        neighbours = np.full((len(q), k - 1), -1, dtype=np.int64)
        for start, _, idx in topk_search(q, g, k, str(self.device)):
            for row, cand in enumerate(idx):
                others = cand[cand != start + row][: k - 1]
                neighbours[start + row, : len(others)] = others
        self.plan.neighbours = neighbours

    def fit(self, resume: bool = True) -> TrainOutcome:
        self.workdir.mkdir(parents=True, exist_ok=True)
        start_epoch, history = 0, []
        best = {"epoch": -1, "score": -1.0}
        if resume and self.checkpoint_path.is_file():
            state = self.load(self.checkpoint_path)
            start_epoch, history, best = state["epoch"], list(state["history"]), dict(state["best"])
            set_rng_state(state["rng"])
            log.info("resumed from %s at epoch %d", self.checkpoint_path, start_epoch)
        global_step = start_epoch * self.steps_per_epoch
        self.module.train()
        recent: list[float] = []  # the logged train/loss: the last 10 steps, across epochs
        for epoch in range(start_epoch, self.recipe.epochs):
            losses = []
            bar = f"{self.cell.name} epoch {epoch + 1}/{self.recipe.epochs}"
            with progress_bar(bar, self.steps_per_epoch) as advance:
                for step, batch in enumerate(self._batches(epoch)):
                    with autocast(self.device, self.recipe.amp):
                        loss = self.module(batch)
                    if not torch.isfinite(loss):
                        kept = (f"the last good checkpoint is {self.checkpoint_path} (epoch {epoch})"
                                if epoch > 0 else "no epoch had finished, so no checkpoint exists")
                        raise TrainingError(
                            f"train/loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                            f"(global step {global_step + 1}); training stopped and {kept}. Lower "
                            f"train.lr / train.head_lr, set train.grad_clip, or use train.amp: off."
                        )
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    if self.recipe.grad_clip:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(
                            [p for g in self.optimizer.param_groups for p in g["params"]],
                            self.recipe.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.scheduler.step()
                    global_step += 1
                    losses.append(loss.item())
                    recent = (recent + losses[-1:])[-10:]
                    advance(loss=losses[-1])
                    if self.rank == 0 and (global_step % 10 == 0 or step == self.steps_per_epoch - 1):
                        self.log_metrics({"train/loss": float(np.mean(recent))}, global_step)
            record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
            score = self.validate(epoch) if self.rank == 0 else None
            if score is not None:
                record["val_R1"] = score
                self.log_metrics({f"val/{self.val_name}/R1": score}, epoch + 1)
            if self.rank == 0 and (score is None or score > best["score"]):
                best = {"epoch": epoch + 1, "score": -1.0 if score is None else score}
                self.save_best(epoch + 1, best["score"])
            if self.recipe.sampler == "similarity" and epoch + 1 < self.recipe.epochs:
                self.mine_similar()
            history.append(record)
            log.info("epoch %d: %s", epoch + 1, record)
            self.save(self.checkpoint_path, self.state_dict(epoch + 1, best, history))
            if self.on_epoch is not None:
                self.on_epoch(record)  # e.g. report to Optuna, which may prune the trial
            if self.world > 1:
                dist.barrier()
        if self.recipe.epochs == 0 and self.rank == 0:
            self.save_best(0, -1.0)
        return TrainOutcome(len(history), best["epoch"], best["score"], history, self.best_path)



