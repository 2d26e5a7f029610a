"""Backbones: the Features contract, trainable blocks, weight files and the offline error.

Everything runs on the CPU with the registry's random-initialised tiny variants; the
full-size entries are only constructed on the meta device (no memory, no weights).
"""

from __future__ import annotations

import copy

import huggingface_hub.constants
import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from gengeo_bench import weights as weights_module
from gengeo_bench.backbones.clip import CLIPVisual, resample_position_embedding
from gengeo_bench.backbones.dinov2 import DINOv2, import_hub_state_dict
from gengeo_bench.backbones.resnet import ResNet
from gengeo_bench.errors import ConfigError, WeightsError
from gengeo_bench.registry import build, get, meta, names

# Parameter names of block i, of what follows the last block, and never-trained extras,
# for the families this file checks in detail (every registered backbone, these and any
# other, also runs the generated tests of tests/test_plugins.py).
BLOCK_PARAMS = {
    "dinov2": ("model.blocks.{}.", ("model.norm.",), ()),
    "clip": ("visual.transformer.resblocks.{}.", ("visual.ln_post.",), ("visual.proj",)),
    "resnet": ("model.layer{}.", (), ()),
    "convnext": ("model.stages.{}.", (), ()),
}
STAGE_OFFSET = {"resnet": 1}  # timm's layer1..layer4


def family(name: str) -> str:
    return meta("backbone", name)["family"]


BACKBONES = [n for n in names("backbone") if family(n) in BLOCK_PARAMS]
TINY = [
    n for n in BACKBONES if str(meta("backbone", n)["weights_licence"]).startswith("random init")
]
FULL = [n for n in BACKBONES if n not in TINY]

# Channel count of each full-size architecture, from the papers / model cards.
WIDTH_BY_ARCH = {
    "vit_small_patch14_dinov2": 384,
    "vit_base_patch14_dinov2": 768,
    "vit_large_patch14_dinov2": 1024,
    "vit_giant_patch14_dinov2": 1536,
    "vit_small_patch14_reg4_dinov2": 384,
    "vit_base_patch14_reg4_dinov2": 768,
    "vit_large_patch14_reg4_dinov2": 1024,
    "vit_giant_patch14_reg4_dinov2": 1536,
    "ViT-B-16": 768,
    "ViT-L-14": 1024,
    "resnet50": 2048,
    "resnet18": 512,
    "convnext_base.fb_in22k_ft_in1k_384": 1024,
}


def tiny(name: str, seed: int = 0, **params):
    torch.manual_seed(seed)
    return build("backbone", name, **params).eval()


def sizes(name: str) -> dict[str, tuple[int, int]]:
    return {view: tuple(hw) for view, hw in meta("backbone", name)["image_size"].items()}


def images(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_registry_has_tiny_and_full_variants_of_each_family():
    assert {family(n) for n in TINY} == set(BLOCK_PARAMS)
    assert {family(n) for n in FULL} == set(BLOCK_PARAMS)


# --------------------------------------------------------------------------- the contract
# (shapes, determinism and the meta record are checked for every entry in test_plugins.py)


@pytest.mark.parametrize("name", TINY)
def test_other_sizes_than_the_registered_ones(name):
    model = tiny(name)
    p = model.patch_size
    with torch.no_grad():
        out = model(images(3 * p, 7 * p, batch=1))
    assert out.patches.shape == (1, model.out_dim, 3, 7)


@pytest.mark.parametrize("name", TINY)
def test_side_not_a_multiple_of_the_patch_is_a_config_error(name):
    model = tiny(name)
    p = model.patch_size
    with pytest.raises(ConfigError, match=rf"patch size {p}\b.*{4 * p} or {5 * p}"):
        model(images(4 * p + 1, 8 * p, batch=1))


# --------------------------------------------------------------------------- trainable blocks


def expected_trainable(model, name: str, trainable_blocks: int | None) -> set[str]:
    block, after, never = BLOCK_PARAMS[family(name)]
    every = {n for n, _ in model.named_parameters() if not n.startswith(never)}
    if trainable_blocks is None:
        return every
    first = model.num_blocks - trainable_blocks
    offset = STAGE_OFFSET.get(family(name), 0)
    prefixes = [block.format(i + offset) for i in range(first, model.num_blocks)]
    prefixes += list(after) if trainable_blocks else []
    return {n for n in every if n.startswith(tuple(prefixes))} if prefixes else set()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("trainable_blocks", [None, 0, 1, 2])
def test_gradients_reach_exactly_the_trainable_parameters(name, trainable_blocks):
    model = tiny(name, trainable_blocks=trainable_blocks).train()
    expected = expected_trainable(model, name, trainable_blocks)
    assert expected or trainable_blocks == 0
    requires = {n for n, p in model.named_parameters() if p.requires_grad}
    assert requires == expected
    assert model.is_frozen == (trainable_blocks == 0)

    out = model(images(*sizes(name)["aerial"]))
    if trainable_blocks == 0:
        assert not out.patches.requires_grad
        return
    loss = out.patches.square().mean() + (0 if out.cls is None else out.cls.square().mean())
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected


@pytest.mark.parametrize("name", TINY)
def test_frozen_blocks_keep_no_activations_for_backward(name):
    model = tiny(name, trainable_blocks=1).train()
    blocks = model.blocks
    tracked: list[bool] = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: tracked.append(o.requires_grad)) for b in blocks
    ]
    model(images(*sizes(name)["aerial"]))
    for hook in hooks:
        hook.remove()
    assert tracked == [False] * (len(blocks) - 1) + [True]


def test_frozen_resnet_stages_keep_their_batchnorm_statistics():
    model = tiny("resnet_tiny", trainable_blocks=1).train()
    frozen, trained = model.model.layer1[0].bn1, model.model.layer4[0].bn1
    before = frozen.running_mean.clone(), trained.running_mean.clone()
    model(images(64, 64))
    assert torch.equal(frozen.running_mean, before[0])
    assert not torch.equal(trained.running_mean, before[1])


@pytest.mark.parametrize("name", TINY)
def test_trainable_blocks_out_of_range(name):
    blocks = tiny(name).num_blocks
    for bad in (-1, blocks + 1):
        with pytest.raises(
            ConfigError, match=rf"trainable_blocks = {bad}.*0 \(frozen\) to {blocks}"
        ):
            tiny(name, trainable_blocks=bad)


# --------------------------------------------------------------------------- value checks


def test_dinov2_register_tokens_are_removed():
    model = tiny("dinov2_tiny")
    assert model.num_prefix_tokens == 1 + 2  # class token + num_reg_tokens
    x = images(56, 112)
    with torch.no_grad():
        out = model(x)
        tokens = model.model.forward_features(x)  # timm's own path: [B, 3 + 4*8, C]
    assert tokens.shape[1] == 3 + 4 * 8
    assert out.patches.shape[2] * out.patches.shape[3] == 4 * 8
    torch.testing.assert_close(out.patches.flatten(2).transpose(1, 2), tokens[:, 3:])
    torch.testing.assert_close(out.cls, tokens[:, 0])


def test_clip_tokens_are_taken_before_the_projection():
    model = tiny("clip_tiny")
    visual = model.visual
    x = images(64, 64)  # the tower's native size
    with torch.no_grad():
        out = model(x)
        pooled = visual(x)  # open_clip: ln_post(class token) @ proj
        visual.output_tokens = True
        _, tokens = visual(x)
        visual.output_tokens = False
    assert out.cls.shape[1] == visual.proj.shape[0] != visual.proj.shape[1]
    torch.testing.assert_close(out.cls @ visual.proj, pooled)
    torch.testing.assert_close(out.patches.flatten(2).transpose(1, 2), tokens)


def test_clip_position_embeddings_are_interpolated_for_panoramas():
    model = tiny("clip_tiny")
    x = images(64, 128)  # grid 8 x 16; trained grid 8 x 8
    resized = copy.deepcopy(model.visual)
    pos = resample_position_embedding(resized.positional_embedding.data, (8, 8), (8, 16))
    resized.positional_embedding = torch.nn.Parameter(pos)
    resized.output_tokens = True
    with torch.no_grad():
        out = model(x)
        _, tokens = resized(x)
    torch.testing.assert_close(out.patches.flatten(2).transpose(1, 2), tokens)
    # a constant grid stays constant: bicubic interpolation, not something else
    flat = torch.ones(1 + 64, 4)
    assert torch.allclose(resample_position_embedding(flat, (8, 8), (8, 16)), torch.ones(129, 4))


@pytest.mark.parametrize("name", TINY)
def test_class_token_only_for_transformers(name):
    with torch.no_grad():
        out = tiny(name)(images(*sizes(name)["aerial"]))
    assert (out.cls is None) == (family(name) in ("resnet", "convnext"))


def test_convnext_patches_are_timm_forward_features():
    model = tiny("convnext_tiny")
    x = images(64, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x).patches, model.model.forward_features(x))
    # The classifier head (pooling, LayerNorm) is not the backbone's: see avgpool.
    assert not any(k.startswith("model.head.") for k in model.state_dict())


def test_resnet_patches_are_the_last_stage_map():
    model = tiny("resnet_tiny")
    x = images(64, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x).patches, model.model.forward_features(x))


@pytest.mark.parametrize("zero_init_last", [True, False])
def test_resnet_zero_init_last_sets_each_blocks_last_batchnorm_scale(zero_init_last):
    model = ResNet("resnet18", layers=[1, 1, 1, 1], channels=[8, 16, 32, 48],
                   zero_init_last=zero_init_last)
    scales = [stage[0].bn2.weight for stage in model.stages]
    for scale in scales:
        torch.testing.assert_close(scale, torch.full_like(scale, 0.0 if zero_init_last else 1.0))
    # the first BatchNorm of a block is never zero-initialised
    assert torch.all(model.stages[0][0].bn1.weight == 1.0)


def test_small_resnet_variants_start_with_open_residual_blocks():
    # With zero-initialised last scales, a random one-block-per-stage network learns
    # several times slower; the registry's small variants must not use it.
    for name in ("resnet_tiny", "resnet_small"):
        model = build("backbone", name)
        assert all(torch.all(stage[0].bn2.weight == 1.0) for stage in model.stages), name


# --------------------------------------------------------------------------- weight files


def saved_state(model, name: str) -> dict[str, torch.Tensor]:
    """The tiny model's weights in the library's own format (timm, or open_clip `visual.*`)."""
    if family(name) == "clip":
        return {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    return dict(model.model.state_dict())


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip(name, suffix, tmp_path):
    source = tiny(name, seed=0)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in saved_state(source, name).items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    x = images(*sizes(name)["ground"])
    loaded = tiny(name, seed=1, weights=str(path))
    fresh = tiny(name, seed=1)
    with torch.no_grad():
        want, got, other = source(x).patches, loaded(x).patches, fresh(x).patches
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(other, want)


@pytest.mark.parametrize("name", TINY)
def test_weights_file_of_the_wrapper_itself(name, tmp_path):
    source = tiny(name, seed=0)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.ckpt")
    loaded = tiny(name, seed=1, weights=str(tmp_path / "w.ckpt"))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("name", TINY)
def test_missing_weights_file_names_the_path(name, tmp_path):
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(WeightsError, match=str(path)):
        tiny(name, weights=str(path))


def test_weights_of_another_model_are_a_weights_error(tmp_path):
    torch.save(tiny("resnet_tiny").model.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(WeightsError, match=r"resnet\.pth.*missing.*unexpected"):
        tiny("dinov2_tiny", weights=str(tmp_path / "resnet.pth"))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a module, not tensors
    with pytest.raises(WeightsError, match="weights_only"):
        tiny("resnet_tiny", weights=str(tmp_path / "pickled.pth"))


# --------------------------------------------------------------------------- DINOv2 release format


def to_release_format(timm_state: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """timm keys -> the original DINOv2 / torch.hub layout.

    The release has a `mask_token`, a position embedding for the class token (first of
    1 + h*w) and, in register models, `register_tokens` with no position embedding.
    """
    state = dict(timm_state)
    width = state["cls_token"].shape[-1]
    out = {"mask_token": torch.zeros(1, width)}
    if "reg_token" in state:
        cls_pos = torch.randn(1, 1, width, generator=generator)
        out["register_tokens"] = state.pop("reg_token")
        out["cls_token"] = state.pop("cls_token") - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, state.pop("pos_embed")], dim=1)
    out.update(state)
    return out


TINY_DINO = {"arch": "vit_small_patch14_dinov2", "embed_dim": 48, "depth": 2, "num_heads": 2}


@pytest.mark.parametrize("num_reg_tokens", [2, 0])
def test_dinov2_release_format_file_matches_timm_format(num_reg_tokens, tmp_path):
    torch.manual_seed(0)
    source = DINOv2(**TINY_DINO, num_reg_tokens=num_reg_tokens).eval()
    source.model.cls_token.data.normal_()  # init is ~1e-6: give it a trained-like scale
    timm_state = dict(source.model.state_dict())
    release = to_release_format(timm_state, torch.Generator().manual_seed(1))
    assert ("register_tokens" in release) == bool(num_reg_tokens)
    torch.save(timm_state, tmp_path / "timm.pth")
    torch.save(release, tmp_path / "release.pth")
    x = images(42, 84)
    with torch.no_grad():
        want = source(x)
        outs = []
        for file in ("timm.pth", "release.pth"):
            torch.manual_seed(5)
            model = DINOv2(**TINY_DINO, num_reg_tokens=num_reg_tokens, weights=str(tmp_path / file))
            outs.append(model.eval()(x))
    for out in outs:
        torch.testing.assert_close(out.patches, want.patches)
        torch.testing.assert_close(out.cls, want.cls)


def test_dinov2_salad_checkpoint_backbone_import():
    """DINOv2-SALAD checkpoints hold torch.hub DINOv2 keys under `backbone.model.`."""
    torch.manual_seed(0)
    source = DINOv2(**TINY_DINO, num_reg_tokens=2).eval()
    source.model.cls_token.data.normal_()
    release = to_release_format(dict(source.model.state_dict()), torch.Generator().manual_seed(1))
    # training checkpoints may nest blocks in chunks: blocks.<chunk>.<index>.
    chunked = {k.replace("blocks.1.", "blocks.0.1.", 1): v for k, v in release.items()}
    salad = {f"backbone.model.{k}": v for k, v in chunked.items()}
    salad["aggregator.score.0.weight"] = torch.zeros(3)

    imported = import_hub_state_dict(salad, prefix="backbone.model.")
    assert set(imported) == set(source.model.state_dict())
    torch.manual_seed(3)
    target = DINOv2(**TINY_DINO, num_reg_tokens=2).eval()
    target.load_weights(salad, prefix="backbone.model.")
    x = images(28, 56)
    with torch.no_grad():
        torch.testing.assert_close(target(x).patches, source(x).patches)


def test_hub_import_renames_giant_mlp_and_keeps_timm_keys():
    t = torch.zeros(1)
    out = import_hub_state_dict(
        {"blocks.3.mlp.w12.weight": t, "blocks.3.mlp.w3.bias": t, "blocks.3.norm1.weight": t}
    )
    assert set(out) == {"blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.bias", "blocks.3.norm1.weight"}
    timm_keys = {"cls_token": t, "reg_token": t, "pos_embed": t, "blocks.0.attn.qkv.weight": t}
    assert import_hub_state_dict(timm_keys) == timm_keys


# --------------------------------------------------------------------------- pretrained weights


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """No network and an empty Hugging Face / torch.hub cache; returns the hub cache dir."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf" / "hub"


def hub_repo(name: str) -> str:
    params = get("backbone", name).params
    if family(name) == "clip":
        return open_clip.get_pretrained_cfg(params["arch"], params["pretrained_tag"])[
            "hf_hub"
        ].rstrip("/")
    return timm.models.get_pretrained_cfg(params["arch"]).hf_hub_id


@pytest.mark.parametrize("name", FULL)
def test_pretrained_offline_without_cache_is_a_weights_error(name, offline_empty_cache):
    with pytest.raises(WeightsError) as info:
        build("backbone", name, pretrained=True)
    message = str(info.value)
    assert f"'{hub_repo(name)}'" in message
    assert str(offline_empty_cache) in message
    assert "weights: /path/to/file" in message
    assert "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("name", ["resnet18", "dinov2_vits14"])
def test_library_download_errors_become_weights_errors(name, offline_empty_cache, monkeypatch):
    # The environment looks online to the harness; the hub library itself refuses.
    monkeypatch.setattr(weights_module, "is_offline", lambda: False)
    with pytest.raises(WeightsError, match=rf"download failed.*'{hub_repo(name)}'"):
        build("backbone", name, pretrained=True)


def test_pretrained_loads_from_the_hub_cache_without_network(offline_empty_cache):
    """A file in the HF cache layout (refs/main -> snapshots/<rev>/) is loaded through timm."""
    small = {"num_classes": 0, "layers": (1, 1, 1, 1), "channels": (8, 8, 8, 8), "stem_width": 8}
    torch.manual_seed(0)
    source = timm.create_model("resnet18", **small)
    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    root = offline_empty_cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0123abcd")
    (root / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(source.state_dict(), str(root / "snapshots" / "0123abcd" / "model.safetensors"))
    torch.manual_seed(1)
    loaded = weights_module.create_timm_pretrained("resnet18", **small)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_pretrained_with_size_overrides_is_a_config_error():
    with pytest.raises(ConfigError, match="size overrides"):
        DINOv2(**TINY_DINO, pretrained=True)
    with pytest.raises(ConfigError, match="size overrides"):
        CLIPVisual(width=48, layers=2, heads=2, patch=8, image=64, pretrained=True)


# --------------------------------------------------------------------------- full-size entries


@pytest.mark.parametrize("name", FULL)
def test_full_size_entries_construct_on_the_meta_device(name):
    params = get("backbone", name).params
    with torch.device("meta"):
        model = build("backbone", name, pretrained=False)
    assert model.out_dim == WIDTH_BY_ARCH[params["arch"]]
    assert model.patch_size == meta("backbone", name)["patch_size"]
    assert model.trainable_blocks == params["trainable_blocks"]
    assert all(p.device.type == "meta" for p in model.parameters())
    trains = [n for n, p in model.named_parameters() if p.requires_grad]
    if params["trainable_blocks"] is not None:
        block, _, _ = BLOCK_PARAMS[family(name)]
        first = model.num_blocks - params["trainable_blocks"]
        assert any(n.startswith(block.format(first)) for n in trains)
        assert not any(n.startswith(block.format(first - 1)) for n in trains)


def test_resnet_runs_channels_last_with_the_values_of_the_contiguous_network():
    """ResNet keeps weights, inputs and its map channels-last (faster on CPU): a layout
    only, the map's values are those of the same timm network run contiguous (NCHW)."""
    model = tiny("resnet_small")
    assert model.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = images(*sizes("resnet_small")["aerial"])
    with torch.no_grad():
        got = model(x).patches
        plain = copy.deepcopy(model.model).to(memory_format=torch.contiguous_format)
        want = plain.forward_features(x.contiguous())
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert got.shape == want.shape == (2, 128, 4, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.abs().mean() > 0.01
