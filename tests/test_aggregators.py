"""Aggregators, each against a closed form or a restatement of its reference definition.

The contract every registered aggregator meets (shapes, seeds, gradients, sharing) is
checked in test_plugins.py; this file checks the values of each one.
"""

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
SMALL_SALAD = {"num_clusters": 4, "cluster_dim": 8, "token_dim": 6}


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
    params = {"in_dim": 16, **SMALL_SALAD, **kw}
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


# ------------------------------------------------------------- registry values, variants


@pytest.mark.parametrize("name", ["netvlad", "salad"])
def test_registry_rejects_wrong_type(name):
    with pytest.raises(ConfigError, match=rf"{name}.*num_clusters"):
        registry.build("aggregator", name, in_dim=16, num_clusters="many")


def test_registry_rejects_bad_values():
    with pytest.raises(ConfigError, match="dropout"):
        registry.build("aggregator", "salad", in_dim=16, dropout=1.5)


@pytest.mark.parametrize("name,extra", [("netvlad", {"proj_dim": 6}), ("salad", {"dustbin": False})])
def test_gradients_reach_all_parameters_of_variants(name, extra):
    torch.manual_seed(0)
    model = registry.build("aggregator", name, in_dim=16, num_clusters=4, **extra).train()
    out = model(features())
    (out * torch.randn_like(out)).sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname


def test_gem_learned_whitening_is_a_linear_map_of_the_normalised_pooling():
    from gengeo_bench.registry import build

    torch.manual_seed(0)
    plain = build("aggregator", "gem", in_dim=6)
    white = build("aggregator", "gem", in_dim=6, whiten=4)
    assert white.out_dim == 4
    feats = Features(torch.rand(3, 6, 2, 2) + 0.1, None)
    expected = torch.nn.functional.normalize(white.whiten(plain(feats)), dim=1)
    torch.testing.assert_close(white(feats), expected)


# ----------------------------------------------------------------- assignments (SALAD, NetVLAD)


def test_salad_assignments_are_the_plan_per_patch_in_the_definitions_units():
    torch.manual_seed(0)
    n, m = 20, 4
    model = salad(sinkhorn_iters=50)
    feats = features()
    a = model.assignments(feats)
    assert a.shape == (2, n, m + 1)
    torch.testing.assert_close(a, model.transport_plan(feats).transpose(1, 2))
    torch.testing.assert_close(a.sum(dim=2), torch.ones(2, n))  # each patch: mass 1
    mass = a.sum(dim=1)  # per cluster, over the patches
    torch.testing.assert_close(mass[:, :m], torch.ones(2, m), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(mass[:, m] / n, torch.full((2,), (n - m) / n), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dust_score", [1e4, -30.0])
def test_salad_dustbin_mass_is_fixed_by_the_marginals_not_by_its_score(dust_score):
    """The reference definition's marginals give each cluster a total mass of 1, so the
    dustbin holds (n - m) of the n patches' mass. Its score is one constant for every
    patch, which Sinkhorn's first row scaling cancels exactly: a huge (or tiny) dustbin
    score leaves the plan unchanged, and the learned `dust_bin` gets no gradient."""
    torch.manual_seed(0)
    n, m = 20, 4
    model = salad()  # the default 3 iterations
    feats = features()
    before = model.assignments(feats)
    with torch.no_grad():
        model.dust_bin.fill_(dust_score)
    after = model.assignments(feats)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
    torch.testing.assert_close(after[..., m].sum(dim=1) / n, torch.full((2,), (n - m) / n),
                               rtol=2e-2, atol=0)
    out = model(feats)
    (out * torch.randn_like(out)).sum().backward()
    assert model.dust_bin.grad.abs() < 1e-6


def test_salad_without_dustbin_gives_each_cluster_n_over_m():
    torch.manual_seed(0)
    n, m = 20, 4
    a = salad(dustbin=False, sinkhorn_iters=50).assignments(features())
    assert a.shape == (2, n, m)
    torch.testing.assert_close(a.sum(dim=2), torch.ones(2, n))
    torch.testing.assert_close(a.sum(dim=1), torch.full((2, m), n / m), rtol=1e-3, atol=1e-3)


def test_netvlad_assignments_are_the_softmax_over_normalised_centroids():
    torch.manual_seed(0)
    vlad = NetVLAD(in_dim=16, num_clusters=4, alpha=7.0)
    feats = features()
    x = F.normalize(feats.patches, dim=1).flatten(2).transpose(1, 2)  # [B, N, C]
    expected = (7.0 * x @ F.normalize(vlad.centroids, dim=1).T).softmax(dim=2)
    torch.testing.assert_close(vlad.assignments(feats), expected)


# --------------------------------------------------------------------------- MixVPR


def mixvpr(**kw):
    from gengeo_bench.aggregators.mixvpr import MixVPR

    params = {"in_dim": 12, "patch_grid": (3, 4), "out_channels": 6, "mix_depth": 2,
              "out_rows": 3, **kw}
    return MixVPR(**params).eval()


def ref_layer_norm(z, ln):
    mean = z.mean(dim=-1, keepdim=True)
    var = ((z - mean) ** 2).mean(dim=-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_mixvpr(head, patches):
    """The paper's equations with the module's weights: mixers over the h*w positions of
    each channel row, then the channel and row projections, flattened channel-major."""
    z = patches.flatten(2)  # [B, C, n]
    for layer in head.mix:
        ln, fc1, fc2 = layer.mix[0], layer.mix[1], layer.mix[3]
        hidden = torch.relu(ref_layer_norm(z, ln) @ fc1.weight.T + fc1.bias)
        z = z + hidden @ fc2.weight.T + fc2.bias
    z = torch.einsum("bcn,oc->bon", z, head.channel_proj.weight) + head.channel_proj.bias[:, None]
    z = torch.einsum("bon,rn->bor", z, head.row_proj.weight) + head.row_proj.bias
    flat = torch.stack([z[:, o, r] for o in range(z.shape[1]) for r in range(z.shape[2])], dim=1)
    return F.normalize(flat, dim=1)


def test_mixvpr_matches_its_equations():
    torch.manual_seed(0)
    head = mixvpr(mlp_ratio=2.0)
    with torch.no_grad():  # trained-like LayerNorm affine, so it is checked too
        for layer in head.mix:
            layer.mix[0].weight.normal_()
            layer.mix[0].bias.normal_()
    feats = features(c=12, h=3, w=4)
    assert head.out_dim == 18
    torch.testing.assert_close(head(feats), ref_mixvpr(head, feats.patches))
    assert head.mix[0].mix[1].weight.shape == (24, 12)  # n * mlp_ratio hidden units


def test_mixvpr_state_dict_has_the_release_keys_and_init():
    head = mixvpr(mix_depth=1)
    assert set(head.state_dict()) == {
        "mix.0.mix.0.weight", "mix.0.mix.0.bias", "mix.0.mix.1.weight", "mix.0.mix.1.bias",
        "mix.0.mix.3.weight", "mix.0.mix.3.bias", "channel_proj.weight", "channel_proj.bias",
        "row_proj.weight", "row_proj.bias",
    }
    big = mixvpr(patch_grid=(20, 20), mix_depth=1).mix[0].mix[1]
    assert big.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(big.bias, torch.zeros_like(big.bias))


def test_mixvpr_refuses_another_grid():
    with pytest.raises(ConfigError, match="built for a 3x4 patch grid and got 3x5"):
        mixvpr()(features(c=12, h=3, w=5))


def test_mixvpr_without_mixers_is_two_projections():
    torch.manual_seed(0)
    head = mixvpr(mix_depth=0)
    feats = features(c=12, h=3, w=4)
    x = feats.patches.flatten(2)  # [B, C, n]
    z = head.row_proj(head.channel_proj(x.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(head(feats), F.normalize(z.flatten(1), dim=1))


# --------------------------------------------------------------------------- BoQ


def boq(**kw):
    from gengeo_bench.aggregators.boq import BoQ

    params = {"in_dim": 12, "proj_channels": 16, "num_queries": 3, "num_layers": 2, "row_dim": 5,
              "num_heads": 2, **kw}
    return BoQ(**params).eval()


def ref_attention(query, source, attn, heads):
    """Multi-head scaled dot-product attention written out with the module's weights."""
    d = query.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q, k, v = (x @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d]
               for i, x in enumerate((query, source, source)))

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(query.shape)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def ref_boq(head, patches, heads):
    """The paper's BoQ: 3x3 projection, then per block a post-norm encoder layer on the
    tokens and learned queries that self-attend, then read the tokens; the stacked query
    outputs are mixed over the query axis and flattened channel-major."""
    x = F.conv2d(patches, head.proj_c.weight, head.proj_c.bias, padding=1)
    x = ref_layer_norm(x.flatten(2).transpose(1, 2), head.norm_input)
    outs = []
    for block in head.boqs:
        enc = block.encoder
        x = ref_layer_norm(x + ref_attention(x, x, enc.self_attn, heads), enc.norm1)
        ff = torch.relu(x @ enc.linear1.weight.T + enc.linear1.bias) @ enc.linear2.weight.T
        x = ref_layer_norm(x + ff + enc.linear2.bias, enc.norm2)
        q = block.queries.expand(x.shape[0], -1, -1)
        q = ref_layer_norm(q + ref_attention(q, q, block.self_attn, heads), block.norm_q)
        outs.append(ref_layer_norm(ref_attention(q, x, block.cross_attn, heads), block.norm_out))
    stacked = torch.cat(outs, dim=1)  # [B, L*Q, D]
    rows = torch.einsum("bqd,rq->bdr", stacked, head.fc.weight) + head.fc.bias
    return F.normalize(rows.reshape(rows.shape[0], -1), dim=1)


def test_boq_matches_its_equations():
    torch.manual_seed(0)
    head = boq()
    feats = features(c=12, h=3, w=4)
    assert head.out_dim == 16 * 5
    with torch.no_grad():
        torch.testing.assert_close(head(feats), ref_boq(head, feats.patches, heads=2),
                                   rtol=1e-4, atol=1e-5)
        # Any grid: the queries attend over however many tokens there are.
        other = features(c=12, h=2, w=7)
        torch.testing.assert_close(head(other), ref_boq(head, other.patches, heads=2),
                                   rtol=1e-4, atol=1e-5)


def test_boq_state_dict_has_the_release_layout():
    head = boq()
    keys = set(head.state_dict())
    for key in ("proj_c.weight", "norm_input.weight", "boqs.0.encoder.self_attn.in_proj_weight",
                "boqs.0.encoder.linear1.weight", "boqs.0.encoder.norm2.bias", "boqs.0.queries",
                "boqs.1.self_attn.out_proj.weight", "boqs.1.norm_q.weight",
                "boqs.1.cross_attn.in_proj_bias", "boqs.1.norm_out.bias", "fc.weight", "fc.bias"):
        assert key in keys, key
    assert head.proj_c.weight.shape == (16, 12, 3, 3)
    assert head.boqs[0].encoder.linear1.weight.shape == (64, 16)  # feed-forward width 4 D
    assert head.boqs[0].queries.shape == (1, 3, 16)
    assert head.fc.weight.shape == (5, 6)  # num_layers * num_queries -> row_dim
    assert boq(proj_channels=128, num_heads=None).boqs[0].cross_attn.num_heads == 2  # D / 64


def test_boq_heads_must_divide_the_width():
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        boq(proj_channels=16, num_heads=3)
    with pytest.raises(ConfigError, match="set num_heads"):
        boq(proj_channels=16, num_heads=None)  # 16 / 64 = 0 heads


# --------------------------------------------------------------------------- avgpool


def test_avgpool_is_layernorm_of_the_mean():
    from gengeo_bench.aggregators.avgpool import AvgPool

    torch.manual_seed(0)
    head = AvgPool(in_dim=16).eval()
    with torch.no_grad():
        head.norm.weight.normal_()
        head.norm.bias.normal_()
    feats = features()
    mean = feats.patches.mean(dim=(2, 3))
    expected = F.normalize(ref_layer_norm(mean, head.norm), dim=1)
    torch.testing.assert_close(head(feats), expected)
    assert set(head.state_dict()) == {"norm.weight", "norm.bias"} and head.norm.eps == 1e-6
    plain = AvgPool(in_dim=16, norm=False)
    torch.testing.assert_close(plain(feats), F.normalize(mean, dim=1))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_salad_token_major_forward_equals_the_convolutions(layout):
    """SALAD runs its 1x1-convolution MLPs as matrix products on token-major features: the
    same descriptor and the same gradients as the convolutions, whatever the map's layout."""
    torch.manual_seed(0)
    model = SALAD(in_dim=16, dustbin=True, dropout=0.0, **SMALL_SALAD).train()
    feats = features(b=3, c=16, h=4, w=5, seed=2)
    patches = feats.patches
    if layout == "channels_last":
        patches = patches.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":  # a ViT's tokens [B, n, C] seen as a map
        patches = patches.flatten(2).transpose(1, 2).contiguous().transpose(1, 2).reshape(3, 16, 4, 5)
    ours_in = patches.detach().clone().requires_grad_(True)
    ref_in = feats.patches.detach().clone().requires_grad_(True)

    def convolutions(x: torch.Tensor) -> torch.Tensor:  # the reference's form of forward
        f = model.cluster_features(x).flatten(2)
        plan = model._plan(model.score(x).flatten(2))[:, : model.num_clusters]
        v = F.normalize(torch.bmm(f, plan.transpose(1, 2)), dim=1).flatten(1)
        t = F.normalize(model.token_features(feats.cls), dim=-1)
        return F.normalize(torch.cat([t, v], dim=-1), dim=-1)

    weights = torch.randn(3, model.out_dim)
    got = model(Features(ours_in, feats.cls))
    want = convolutions(ref_in)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    (got * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    (want * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=0, msg=name)
    assert grads["cluster_features.0.weight"].abs().sum() > 0
