"""Backbone weights: where they come from and which of them train.

Loading:

- `load_state_dict_file(path)` reads a local file: `.safetensors` through safetensors,
  `.pth` / `.pt` / `.bin` / `.ckpt` through `torch.load(weights_only=True)` (tensors only,
  no pickled code). Wrappers such as `{"state_dict": ...}` (Lightning) and DDP `module.`
  prefixes are removed.
- `load_into(module, state_dict, source)` loads strictly and turns a key or shape mismatch
  into a `WeightsError` that names the file and the first offending keys.
- Pretrained weights come from the Hugging Face hub cache. `hf_cache_dir()` and
  `is_offline()` read the environment at call time (`HF_HUB_CACHE`, `HF_HOME`,
  `HF_HUB_OFFLINE`), so they agree with what a user just exported. When the file is not
  cached and the hub is offline, `missing_weights_error` says which file of which hub repo
  to fetch, where to put it, and that `weights: /path/to/file` works too. Nothing ever falls
  back to random weights.
- `create_timm_pretrained(arch, **kwargs)` builds a timm model with its pretrained weights:
  from the cache when the file is there (no network call at all), downloaded by timm
  otherwise, and a `WeightsError` when neither works. `create_timm_model(...)` is what the
  timm backbones call: pretrained or random-initialised, checked to be the expected class.

Training:

- `check_trainable_blocks(value, num_blocks, what)` validates `trainable_blocks`
  (None = everything trains, 0 = frozen, N = the last N blocks and what follows them).
- `train_only(module, parts)`: every parameter of `module` frozen except those of `parts`.
- `check_input_size(h, w, multiple, what)`: the input-side check every backbone runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gengeo_bench.errors import ConfigError, WeightsError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
_TRUE = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- local files


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint (`state_dict` / `model` wrappers, `module.`)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a mapping of parameter names to tensors, got {type(obj)}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weight file into a state dict on the CPU; any failure is a `WeightsError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file not found: {path}. Check the `weights:` path of the backbone "
            f"(absolute, or relative to {Path.cwd()})."
        )
    suffix = path.suffix.lower()
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        elif suffix in TORCH_SUFFIXES:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(
                f"{path}: unsupported weight file type '{suffix}'; expected one of "
                f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}."
            )
        state = unwrap_state_dict(obj)
    except WeightsError:
        raise
    except Exception as exc:  # unpickling refused, truncated file, not a state dict
        raise WeightsError(
            f"{path}: cannot read weights ({type(exc).__name__}: {exc}). Files are loaded with "
            f"torch.load(weights_only=True): save a plain state_dict (or .safetensors)."
        ) from exc
    if not state:
        raise WeightsError(f"{path}: the file holds no tensors.")
    return state


def read_state(
    source: str | Path | Mapping[str, torch.Tensor], prefix: str = ""
) -> tuple[str, dict[str, torch.Tensor]]:
    """(a name for messages, the state dict under `prefix`) from a file path or a mapping."""
    if isinstance(source, (str, Path)):
        return str(source), strip_prefix(load_state_dict_file(source), prefix)
    return "state dict", strip_prefix(unwrap_state_dict(source), prefix)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with `prefix`, with the prefix removed ('' keeps all)."""
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Strict `load_state_dict`; keys under `ignore_prefixes` absent from `module` are dropped.

    A missing, unexpected or wrongly shaped tensor is a `WeightsError` naming `source`.
    """
    own = module.state_dict()
    state = {
        k: v
        for k, v in state_dict.items()
        if k in own or not any(k.startswith(p) for p in ignore_prefixes)
    }
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:3])})")
        raise WeightsError(
            f"{source}: the weights do not fit {type(module).__name__}: {'; '.join(parts)}. "
            f"Check that the file was saved from the same architecture and size."
        )
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- hub cache


def is_offline() -> bool:
    """Whether the Hugging Face hub is switched off (environment read now, not at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return True


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache directory, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def torch_hub_checkpoint_dir() -> Path:
    """Where torch.hub / timm keep URL downloads (`$TORCH_HOME/hub/checkpoints`)."""
    return Path(torch.hub.get_dir()).expanduser() / "checkpoints"


def find_cached(
    repo_id: str | None, filenames: Iterable[str], url: str | None = None
) -> Path | None:
    """A cached copy of one of `filenames` from hub repo `repo_id` (or of `url`), if any."""
    if repo_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if url:
        candidate = torch_hub_checkpoint_dir() / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def missing_weights_error(
    what: str,
    repo_id: str | None,
    filenames: list[str],
    url: str | None = None,
    cause: BaseException | None = None,
) -> WeightsError:
    """The error for pretrained weights that are neither cached nor downloadable."""
    why = (
        "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)"
        if is_offline()
        else f"the download failed ({type(cause).__name__}: {cause})"
        if cause is not None
        else "they could not be downloaded"
    )
    lines = [f"pretrained weights for {what} are not in the local cache and {why}."]
    if repo_id:
        files = " or ".join(f"'{f}'" for f in filenames)
        lines.append(
            f"Get file {files} of the Hugging Face hub repo '{repo_id}' into the hub cache "
            f"{hf_cache_dir()} (on a connected machine: `hf download {repo_id} "
            f"{filenames[0]}`, then copy that machine's hub cache directory here; HF_HOME or "
            f"HF_HUB_CACHE choose where the cache is)."
        )
    if url:
        lines.append(f"The original release is {url}.")
    lines.append(
        "Or pass a local file in the backbone's params: `weights: /path/to/file` "
        "(.safetensors, .pth, .pt or .bin). Random weights are never used instead."
    )
    return WeightsError(" ".join(lines))


def create_timm_pretrained(arch: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model(arch, pretrained=True, **kwargs)`, cache first, errors explained."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise ConfigError(f"timm model '{arch}' has no pretrained weights; set pretrained: false.")
    repo_id = cfg.hf_hub_id
    filenames = (
        [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    )
    url = cfg.url if isinstance(cfg.url, str) and cfg.url else None
    what = f"timm model '{arch}'" + (f" ({repo_id})" if repo_id else "")
    cached = find_cached(repo_id, filenames, url)
    if cached is not None:  # load the cached file through timm's own filter: no network call
        return timm.create_model(
            arch, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **kwargs
        )
    if is_offline():
        raise missing_weights_error(what, repo_id, filenames, url)
    try:
        return timm.create_model(arch, pretrained=True, cache_dir=str(hf_cache_dir()), **kwargs)
    except Exception as exc:  # hub errors, connection errors, truncated downloads
        raise missing_weights_error(what, repo_id, filenames, url, cause=exc) from exc


def create_timm_model(arch: str, pretrained: bool, weights: str | Path | None, expected: type,
                      what: str, **kwargs: Any) -> nn.Module:
    """timm's `arch` with released weights when `pretrained` and no local `weights` file
    (which the caller loads afterwards), else random-initialised; checked to be `expected`."""
    import timm

    if pretrained and weights is None:
        model = create_timm_pretrained(arch, **kwargs)
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    if not isinstance(model, expected):
        raise ConfigError(f"{what}: expected a timm {expected.__name__}, got {type(model)}.")
    return model


# --------------------------------------------------------------------------- training


def check_trainable_blocks(value: int | None, num_blocks: int, what: str) -> int | None:
    """`trainable_blocks` checked against the model's block count."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= num_blocks:
        raise ConfigError(
            f"{what}: trainable_blocks = {value!r}, but the model has {num_blocks} blocks. "
            f"Use an integer from 0 (frozen) to {num_blocks}, or null to train everything."
        )
    return value


def train_only(module: nn.Module, parts: Iterable[nn.Module | nn.Parameter]) -> None:
    """Freeze every parameter of `module`, then let the parameters of `parts` train."""
    module.requires_grad_(False)
    for part in parts:
        part.requires_grad_(True)


def check_input_size(height: int, width: int, multiple: int, what: str) -> None:
    """A `ConfigError` when a side is not a multiple of `multiple`, naming sizes that work."""
    if height % multiple == 0 and width % multiple == 0 and height > 0 and width > 0:
        return

    def near(side: int) -> str:
        if side % multiple == 0:
            return str(side)
        low = side // multiple * multiple
        return f"{low} or {low + multiple}" if low else str(multiple)

    raise ConfigError(
        f"{what}: input size {height}x{width} (height x width) is not a multiple of the "
        f"patch size {multiple}; use sides that are multiples of {multiple}, e.g. height "
        f"{near(height)} and width {near(width)} (set the dataset's image_size)."
    )
