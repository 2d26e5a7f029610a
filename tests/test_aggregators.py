"""Aggregators: GeM, NetVLAD, SALAD — values against direct computations and a reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gengeo_bench import registry
from gengeo_bench.aggregators.gem import GeM
from gengeo_bench.aggregators.netvlad import NetVLAD
from gengeo_bench.aggregators.salad import SALAD
from gengeo_bench.errors import ConfigError
from gengeo_bench.features import Features

# Small sizes everywhere: the suite shares two CPU cores.
SMALL = {
    "gem": {},
    "netvlad": {"num_clusters": 4},
    "salad": {"num_clusters": 4, "cluster_dim": 8, "token_dim": 6},
}


def features(b: int = 2, c: int = 16, h: int = 4, w: int = 5, cls: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(b, c, h, w, generator=g)
    token = torch.randn(b, c, generator=g) if cls else None
    return Features(patches, token)


# --------------------------------------------------------------------------- GeM


def test_gem_p1_is_clamped_mean():
    feats = features()
    gem = GeM(in_dim=16, p=1.0, eps=1e-6)
    expected = F.normalize(feats.patches.clamp(min=1e-6).mean(dim=(2, 3)), dim=1)
    torch.testing.assert_close(gem(feats), expected)


def test_gem_large_p_approaches_max():
    x = torch.rand(2, 8, 4, 4) * 0.9 + 0.1  # positive, so the clamp does not act
    gem = GeM(in_dim=8, p=100.0)
    expected = F.normalize(x.amax(dim=(2, 3)), dim=1)
    out = gem(Features(x))
    # mean(x^p)^(1/p) >= max * (1/16)^(1/100) ~ 0.973 max: close to max, far from the mean.
    torch.testing.assert_close(out, expected, atol=0.03, rtol=0)
    mean = F.normalize(x.mean(dim=(2, 3)), dim=1)
    assert (out - expected).abs().max() < (mean - expected).abs().max()


def test_gem_unit_norm_and_p_learns():
    feats = features()
    gem = GeM(in_dim=16)
    out = gem(feats)
    assert out.shape == (2, 16) and gem.out_dim == 16
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert gem.p.requires_grad and gem.p.item() == pytest.approx(3.0)
    (out[:, 0] - out[:, 1]).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0
    assert gem.cluster_params == ()


# ------------------------------------------------------------------------- NetVLAD


def test_netvlad_one_cluster_is_normalised_residual_sum():
    feats = features(c=8)
    vlad = NetVLAD(in_dim=8, num_clusters=1)
    with torch.no_grad():
        vlad.centroids.copy_(torch.randn(1, 8))
    x = F.normalize(feats.patches, dim=1).flatten(2)  # [B, C, N]
    residual_sum = (x - vlad.centroids[0][None, :, None]).sum(dim=2)
    expected = F.normalize(residual_sum, dim=1)
    torch.testing.assert_close(vlad(feats), expected)


def clustered(k: int = 4, c: int = 16, per: int = 200, noise: float = 0.05):
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(k, c, generator=g), dim=1)
    points = centres.repeat_interleave(per, 0) + noise * torch.randn(k * per, c, generator=g)
    return centres, points


def check_initialised(vlad: NetVLAD, centres: torch.Tensor, points: torch.Tensor) -> None:
    found = vlad.centroids.detach()
    # Each true centre has a k-means centroid close to it (and vice versa: a bijection).
    dist = torch.cdist(centres, found)
    nearest = dist.argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(len(centres)))
    assert dist.min(dim=1).values.max() < 0.05
    # alpha as in the authors' release, recomputed here from the descriptors.
    x = F.normalize(points, dim=1)
    top2 = (x @ F.normalize(found, dim=1).T).topk(2, dim=1).values
    alpha = -math.log(0.01) / (top2[:, 0] - top2[:, 1]).mean().item()
    assert vlad.alpha == pytest.approx(alpha, rel=1e-4)
    expected = alpha * F.normalize(found, dim=1)
    torch.testing.assert_close(
        vlad.assign.weight[:, :, 0, 0].detach(), expected, rtol=1e-4, atol=1e-4
    )


def test_netvlad_initialise_from_descriptors():
    centres, points = clustered()
    vlad = NetVLAD(in_dim=16, num_clusters=4)
    vlad.initialise(points)
    check_initialised(vlad, centres, points)
    assert vlad.alpha != 100.0


def test_netvlad_initialise_from_features():
    centres, points = clustered()
    # The same descriptors as a [B, C, h, w] map: 4 images of 10 x 20 patches.
    patches = points.reshape(4, 10, 20, 16).permute(0, 3, 1, 2)
    vlad = NetVLAD(in_dim=16, num_clusters=4)
    vlad.initialise(Features(patches))
    check_initialised(vlad, centres, points)


def test_netvlad_dims_norm_and_projection():
    feats = features(c=16)
    vlad = NetVLAD(in_dim=16, num_clusters=4)
    out = vlad(feats)
    assert vlad.out_dim == 64 and out.shape == (2, 64)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    proj = NetVLAD(in_dim=16, num_clusters=4, proj_dim=6)
    assert proj.out_dim == 24 and proj(feats).shape == (2, 24)
    assert proj.proj.weight.shape == (6, 16, 1, 1) and proj.proj.bias is None
    assert vlad.cluster_params == ("assign", "centroids")
    # Intra-normalisation: each cluster's block has the same norm 1/sqrt(K).
    blocks = out.reshape(2, 4, 16).norm(dim=2)
    torch.testing.assert_close(blocks, torch.full((2, 4), 0.5))


def test_netvlad_initialise_needs_enough_descriptors():
    with pytest.raises(ValueError, match="at least as many"):
        NetVLAD(in_dim=4, num_clusters=8).initialise(torch.randn(5, 4))


# --------------------------------------------------------------------------- SALAD


def salad(**kw) -> SALAD:
    params = {"in_dim": 16, **SMALL["salad"], **kw}
    return SALAD(**params).eval()


@pytest.mark.parametrize("dustbin", [True, False])
def test_salad_plan_columns_sum_to_one(dustbin):
    torch.manual_seed(0)
    model = salad(dustbin=dustbin)
    plan = model.transport_plan(features())
    m, n = 4, 20
    assert plan.shape == (2, m + dustbin, n)
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(2, n))
    assert (plan >= 0).all()


def test_salad_rows_reach_their_marginals():
    torch.manual_seed(0)
    n, m = 20, 4
    plan = salad(dustbin=False, sinkhorn_iters=50).transport_plan(features())
    torch.testing.assert_close(plan.sum(dim=2), torch.full((2, m), n / m), rtol=1e-3, atol=1e-3)
    # With the dustbin: 1 per cluster, n - m to the dustbin (after the x(n+m) rescale).
    plan = salad(dustbin=True, sinkhorn_iters=50).transport_plan(features())
    rows = plan.sum(dim=2)
    torch.testing.assert_close(rows[:, :m], torch.ones(2, m), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rows[:, m], torch.full((2,), float(n - m)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dustbin", [True, False])
@pytest.mark.parametrize("cls", [True, False])
def test_salad_blocks_have_equal_norm(dustbin, cls):
    torch.manual_seed(0)
    m, ell, g = 4, 8, 6
    model = salad(dustbin=dustbin)
    out = model(features(cls=cls))
    assert out.shape == (2, m * ell + g) == (2, model.out_dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    expected = torch.full((2,), 1 / math.sqrt(1 + m))
    torch.testing.assert_close(out[:, :g].norm(dim=1), expected)
    clusters = out[:, g:]
    for k in range(m):
        torch.testing.assert_close(clusters[:, k::m].norm(dim=1), expected)


def test_salad_default_dims_and_cluster_params():
    model = SALAD(in_dim=768)
    assert model.out_dim == 8448
    assert model.cluster_params == ("score", "dust_bin")
    plain = SALAD(in_dim=8, num_clusters=2, cluster_dim=2, token_dim=2, dustbin=False)
    assert plain.cluster_params == ("score",)
    assert "dust_bin" not in dict(plain.named_parameters())
    assert SALAD.cluster_params == ("score", "dust_bin")  # the class attribute is untouched
    assert "dust_bin" not in plain.state_dict()


@pytest.mark.parametrize("dustbin", [True, False])
def test_salad_cluster_params_can_be_tied(dustbin):
    # As CrossViewModel does for share: clusters, by the class attribute's names.
    ground, aerial = salad(dustbin=dustbin), salad(dustbin=dustbin)
    for name in type(ground).cluster_params:
        setattr(aerial, name, getattr(ground, name))
    assert aerial.score is ground.score
    assert aerial.cluster_features is not ground.cluster_features
    feats = features()
    torch.testing.assert_close(aerial.transport_plan(feats), ground.transport_plan(feats))
    shared = {id(p) for p in ground.parameters()} & {id(p) for p in aerial.parameters()}
    assert len(shared) == 4 + dustbin  # score.0/3 weight and bias, and the dustbin


def test_salad_dustbin_needs_enough_patches():
    with pytest.raises(ValueError, match="patches"):
        salad(num_clusters=30)(features())


# A restatement of the reference SALAD, written from the paper's equations in the
# repeat/unsqueeze style of its code release, with the reference parameter names.


def ref_log_otp(log_a, log_b, scores, iters, reg=1.0):
    scores = scores / reg
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iters):
        u = log_a - torch.logsumexp(scores + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(scores + u.unsqueeze(2), dim=1)
    return scores + u.unsqueeze(2) + v.unsqueeze(1)


def ref_matching_probs(scores, dustbin_score, iters):
    b, m, n = scores.shape
    aug = torch.empty(b, m + 1, n, dtype=scores.dtype)
    aug[:, :m, :n] = scores
    aug[:, m, :] = dustbin_score
    norm = -torch.tensor(math.log(n + m))
    log_a = norm.expand(m + 1).contiguous()
    log_b = norm.expand(n).contiguous()
    log_a[-1] = log_a[-1] + math.log(n - m)
    log_a, log_b = log_a.expand(b, -1), log_b.expand(b, -1)
    return ref_log_otp(log_a, log_b, aug, iters) - norm


class RefSALAD(nn.Module):
    def __init__(self, num_channels, num_clusters, cluster_dim, token_dim):
        super().__init__()
        self.num_clusters, self.cluster_dim = num_clusters, cluster_dim
        self.token_features = nn.Sequential(
            nn.Linear(num_channels, 512), nn.ReLU(), nn.Linear(512, token_dim)
        )
        self.cluster_features = nn.Sequential(
            nn.Conv2d(num_channels, 512, 1),
            nn.Identity(),
            nn.ReLU(),
            nn.Conv2d(512, cluster_dim, 1),
        )
        self.score = nn.Sequential(
            nn.Conv2d(num_channels, 512, 1),
            nn.Identity(),
            nn.ReLU(),
            nn.Conv2d(512, num_clusters, 1),
        )
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, t):
        f = self.cluster_features(x).flatten(2)
        p = self.score(x).flatten(2)
        t = self.token_features(t)
        p = torch.exp(ref_matching_probs(p, self.dust_bin, 3))[:, :-1, :]
        p = p.unsqueeze(1).repeat(1, self.cluster_dim, 1, 1)
        f = f.unsqueeze(2).repeat(1, 1, self.num_clusters, 1)
        f = torch.cat(
            [F.normalize(t, p=2, dim=-1), F.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1)],
            dim=-1,
        )
        return F.normalize(f, p=2, dim=-1)


def test_salad_reproduces_reference(tmp_path):
    c, m, ell, g = 24, 6, 10, 12
    torch.manual_seed(3)
    ref = RefSALAD(c, m, ell, g)
    with torch.no_grad():
        ref.dust_bin.fill_(0.7)  # not the init value, so loading it is checked
    path = tmp_path / "salad_ref.pt"
    torch.save(ref.state_dict(), path)
    ours = registry.build(
        "aggregator", "salad", in_dim=c, num_clusters=m, cluster_dim=ell, token_dim=g, dropout=0.0
    )
    ours.load_state_dict(torch.load(path, weights_only=True))  # strict: same keys
    ours.eval(), ref.eval()
    for cls in (True, False):
        feats = features(b=3, c=c, h=5, w=7, cls=cls, seed=5)
        with torch.no_grad():
            expected = ref(feats.patches, feats.global_token)
            got = ours(feats)
        assert got.shape == expected.shape == (3, m * ell + g)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------- registry, seeds, grads


@pytest.mark.parametrize("name", ["gem", "netvlad", "salad"])
def test_registry_builds_each(name):
    model = registry.build("aggregator", name, in_dim=16, **SMALL[name])
    out = model.eval()(features())
    assert out.shape == (2, model.out_dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert isinstance(type(model).cluster_params, tuple)
    for attr in model.cluster_params:
        assert isinstance(getattr(model, attr), (nn.Module, nn.Parameter))


@pytest.mark.parametrize("name", ["netvlad", "salad"])
def test_registry_rejects_wrong_type(name):
    with pytest.raises(ConfigError, match=rf"{name}.*num_clusters"):
        registry.build("aggregator", name, in_dim=16, num_clusters="many")


def test_registry_rejects_bad_values():
    with pytest.raises(ConfigError, match="dropout"):
        registry.build("aggregator", "salad", in_dim=16, dropout=1.5)


@pytest.mark.parametrize("name", ["gem", "netvlad", "salad"])
def test_deterministic_under_seed(name):
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = registry.build("aggregator", name, in_dim=16, **SMALL[name]).train()
        outs.append(model(features()))  # train mode: dropout masks follow the seed too
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(8)
    other = registry.build("aggregator", name, in_dim=16, **SMALL[name]).train()(features())
    if name != "gem":  # GeM has no random weights
        assert not torch.allclose(outs[0], other)


@pytest.mark.parametrize(
    "name,extra",
    [
        ("gem", {}),
        ("netvlad", {}),
        ("netvlad", {"proj_dim": 6}),
        ("salad", {}),
        ("salad", {"dustbin": False}),
    ],
)
def test_gradients_reach_all_parameters(name, extra):
    torch.manual_seed(0)
    model = registry.build("aggregator", name, in_dim=16, **SMALL[name], **extra).train()
    feats = features()
    feats.patches.requires_grad_(True)
    out = model(feats)
    # A loss that depends on every output coordinate non-uniformly.
    (out * torch.randn_like(out)).sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert param.grad.abs().sum() > 0, pname
    assert feats.patches.grad.abs().sum() > 0


def test_gem_learned_whitening_is_a_linear_map_of_the_normalised_pooling():
    from gengeo_bench.registry import build

    torch.manual_seed(0)
    plain = build("aggregator", "gem", in_dim=6)
    white = build("aggregator", "gem", in_dim=6, whiten=4)
    assert white.out_dim == 4
    feats = Features(torch.rand(3, 6, 2, 2) + 0.1, None)
    expected = torch.nn.functional.normalize(white.whiten(plain(feats)), dim=1)
    torch.testing.assert_close(white(feats), expected)
