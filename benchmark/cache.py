"""On-disk caches that make ablations cheap: descriptors and frozen-backbone features.

Both live under `cache_dir()` (`$GENGEO_CACHE`, default `~/.cache/gengeo-bench`), are
keyed by a hash of everything that determines their content, are written atomically
(a temporary file renamed into place, so a killed process never leaves a half-written
entry that looks complete), and are bounded in size: after each write the least recently
used entries beyond `$GENGEO_CACHE_MAX_GB` (default 20) are deleted. Deleting any of them
by hand is always safe: a missing entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

DEFAULT_MAX_GB = 20.0


def cache_dir(*parts: str) -> Path:
    """`$GENGEO_CACHE/<parts>` (created), default root `~/.cache/gengeo-bench`."""
    root = Path(os.environ.get("GENGEO_CACHE", Path.home() / ".cache" / "gengeo-bench"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj`."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def state_dict_hash(module: torch.nn.Module, length: int = 16) -> str:
    """sha256 over a module's parameters and buffers (names, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:length]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def max_bytes() -> int:
    return int(float(os.environ.get("GENGEO_CACHE_MAX_GB", DEFAULT_MAX_GB)) * 1024**3)


def enforce_limit(folder: Path, limit: int | None = None) -> list[Path]:
    """Delete least recently used `*.safetensors` entries until the folder fits `limit`."""
    limit = max_bytes() if limit is None else limit
    entries = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in entries)
    removed = []
    while entries and total > limit:
        victim = entries.pop(0)
        total -= victim.stat().st_size
        victim.unlink(missing_ok=True)
        removed.append(victim)
    return removed


class TensorCache:
    """A folder of safetensors files, one per key: `get(key)` / `put(key, tensors)`."""

    def __init__(self, name: str, root: Path | None = None):
        self.folder = (root / name) if root is not None else cache_dir(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        try:
            tensors = load_file(path)
        except (FileNotFoundError, OSError, RuntimeError, ValueError):
            # Absent, deleted meanwhile or unreadable: recompute (and overwrite).
            self.misses += 1
            return None
        os.utime(path)  # least-recently-used order for eviction
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(self.path(key), lambda tmp: save_file(contiguous, str(tmp)))
        enforce_limit(self.folder)

    def get_or_compute(
        self, key: str, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        cached = self.get(key)
        if cached is not None:
            return cached
        tensors = compute()
        self.put(key, tensors)
        return tensors
