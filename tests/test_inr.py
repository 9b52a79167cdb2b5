"""The six INR families: the paper's parameter counts, the batched functional API, and the fast KAN.

The fast KAN path is checked against the straightforward Cox-de Boor recursion (the paper code's formulation)
in float64: the basis itself, the layer output, and gradients w.r.t. both inputs and coefficients, including
inputs exactly on knots, just beside them, in the extended knot range and far outside it.
"""

from __future__ import annotations

import math

import pytest
import torch

from fewsound.errors import ConfigError
from fewsound.inr import FAMILIES, build_inr, coordinates, presets
from fewsound.inr.kan import (
    KanConfig,
    bspline_basis_fast,
    bspline_basis_recursion,
    kan_layer_fast,
    kan_layer_recursion,
    knots,
    spline_contract_fast,
    spline_contract_recursion,
)

F64 = torch.float64

# --- parameter counts (numbers from the paper's tables) -------------------------------------------------------

TABLE1 = {"nerf": 33_261, "siren": 31_191, "finer": 31_191, "wire": 31_191, "rff": 39_201, "kan": 33_768}


@pytest.mark.parametrize("family", list(TABLE1))
def test_table1_counts(family):
    inr = build_inr(family, **presets.table1()[family])
    assert inr.num_params() == TABLE1[family]
    # the defaults are Table 1's configuration
    assert build_inr(family).num_params() == TABLE1[family]
    expected_real = 62_202 if family == "wire" else TABLE1[family]
    assert inr.num_real_params() == expected_real
    # the count is what init actually allocates
    params, _ = inr.init([0])
    assert sum(p[0].numel() for p in params.values()) == TABLE1[family]


KAN_ABLATION = [
    ({"encoding_length": 2}, 23_016),
    ({"encoding_length": 4}, 25_704),
    ({"encoding_length": 8}, 31_080),
    ({"encoding_length": 10}, 33_768),
    ({"encoding_length": 12}, 36_456),
    ({"encoding_length": 16}, 41_832),
    ({"encoding_length": 24}, 52_584),
    ({"widths": (24, 12, 6)}, 10_500),
    ({"widths": (24, 24, 12, 6)}, 18_564),
    ({"widths": (48, 12, 6)}, 19_908),
    ({"widths": (48, 12, 12, 6)}, 21_924),
    ({"widths": (48, 16, 8)}, 23_408),
    ({"widths": (96, 48, 24)}, 102_480),
    ({"spline_order": 1}, 28_860),
    ({"spline_order": 3}, 33_300),
    ({"spline_order": 5}, 37_740),
    ({"spline_order": 7}, 42_180),
    ({"grid_size": 1}, 11_100),
    ({"grid_size": 5}, 19_980),
    ({"grid_size": 12}, 35_520),
    ({"grid_size": 17}, 46_620),
    ({"enable_scale_spline": False}, 28_860),
]


@pytest.mark.parametrize("overrides,count", KAN_ABLATION)
def test_kan_ablation_counts(overrides, count):
    base = {"encoding_length": 8}  # the ablation base; Table 1's KAN differs only in encoding length (10)
    assert build_inr("kan", **{**base, **overrides}).num_params() == count


def test_kan_ablation_preset_covers_every_row():
    rows = presets.kan_ablation()
    got = {(knob, value): build_inr("kan", **ov).num_params() for knob, value, ov in rows}
    for overrides, count in KAN_ABLATION:
        assert count in got.values(), (overrides, count)
    assert got[("encoding_length", 8)] == 31_080  # the base row
    for (knob, value, paper), (knob2, value2, _) in zip(presets.kan_ablation_counts(), rows):
        assert (knob, value) == (knob2, value2)
        assert got[(knob, value)] == paper


def test_params_command(capsys):
    from fewsound.cli import main

    assert main(["params", "--preset", "table1"]) == 0
    out = capsys.readouterr().out
    for family, count in TABLE1.items():
        assert family in out and f"{count:,}" in out
    assert "62,202" in out
    assert main(["params", "--preset", "kan-ablation"]) == 0
    out = capsys.readouterr().out
    assert "102,480" in out and "DIFFERS" not in out


# --- the batched functional API ------------------------------------------------------------------------------


def test_coordinates():
    t = coordinates(5)
    assert t.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    t = coordinates(32768)
    assert t.shape == (32768,) and t[0] == -1 and t[-1] == 1 and t.dtype == torch.float32
    with pytest.raises(ConfigError):
        coordinates(1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shapes_and_t_forms(family):
    inr = build_inr(family)
    assert inr.name == family
    params, buffers = inr.init([3, 4, 5])
    n = 256
    t = coordinates(n)
    y = inr(params, t, buffers)
    assert y.shape == (3, n) and y.dtype == torch.float32 and torch.isfinite(y).all()
    # [B, N] with the same rows == [N]
    assert torch.allclose(inr(params, t.expand(3, n), buffers), y)
    # [B, N] with different rows: row b only sees network b (float64: SIREN's omega_0 = 2000 amplifies
    # float32 rounding differences between batched and single matmuls)
    params, buffers = inr.init([3, 4, 5], dtype=F64)
    t = t.to(F64)
    tb = torch.stack([t, t.flip(0), t * 0.5])
    yb = inr(params, tb, buffers)
    for b in range(3):
        one = {k: v[b : b + 1] for k, v in params.items()}
        bufs = {k: v[b : b + 1] for k, v in buffers.items()}
        assert torch.allclose(yb[b], inr(one, tb[b], bufs)[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_equals_separate(family):
    """Clip b's tensors depend only on seeds[b]; a packed forward equals B separate ones (float64)."""
    inr = build_inr(family)
    seeds = [11, 7, 11]
    params, buffers = inr.init(seeds, dtype=F64)
    t = coordinates(512, dtype=F64)
    y = inr(params, t, buffers)
    assert torch.equal(y[0], y[2])  # same seed, same network
    for b, seed in enumerate(seeds):
        p1, b1 = inr.init([seed], dtype=F64)
        for k in params:
            assert torch.equal(params[k][b], p1[k][0]), k
        for k in buffers:
            assert torch.equal(buffers[k][b], b1[k][0]), k
        assert torch.allclose(y[b], inr(p1, t, b1)[0], rtol=1e-10, atol=1e-10)
    # different seeds give different networks
    assert not torch.equal(params[next(iter(params))][0], params[next(iter(params))][1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_stay_per_clip(family):
    """The loss of clip 0 gives zero gradient to clip 1's parameters (what a packed fit relies on)."""
    inr = build_inr(family)
    params, buffers = inr.init([0, 1], dtype=F64)
    for p in params.values():
        p.requires_grad_(True)
    y = inr(params, coordinates(128, dtype=F64), buffers)
    y[0].square().sum().backward()
    for name, p in params.items():
        assert p.grad[1].abs().max() == 0, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad[0].abs().max() > 0 for p in params.values())


def test_shared_buffers_broadcast():
    """Buffers from one init([seed]) can serve a batch of networks (a hypernetwork's shared encoding)."""
    inr = build_inr("kan")
    params, buffers = inr.init([0, 1])
    _, shared = inr.init([9])
    t = coordinates(64)
    assert torch.allclose(inr(params, t, shared), inr(params, t, buffers))  # freq is the same fixed buffer


def test_rff_frequencies_are_fixed_buffers_drawn_per_seed():
    inr = build_inr("rff", sigma=300.0)
    params, buffers = inr.init([0, 1])
    assert "rff_b" in buffers and "rff_b" not in params and buffers["rff_b"].shape == (2, 45)
    assert not torch.equal(buffers["rff_b"][0], buffers["rff_b"][1])
    assert 100 < buffers["rff_b"].std() < 900  # N(0, 300^2)


def test_wire_is_complex_with_real_output():
    inr = build_inr("wire")
    params, buffers = inr.init([0])
    assert not params["w0"].is_complex() and params["w1"].is_complex() and params["w5"].is_complex()
    y = inr(params, coordinates(128), buffers)
    assert not y.is_complex()


def test_wire_real_planes_equal_complex_reference():
    """The real-arithmetic WIRE (block-matrix bmm, hand-written Gabor backward) == torch complex ops, float64."""
    inr = build_inr("wire", omega_i=3.0, s0=1.5)  # not the defaults: larger omega / s0 exercise more of psi
    params, buffers = inr.init([0, 1], dtype=F64)
    for p in params.values():
        p.requires_grad_(True)
    t = coordinates(300, dtype=F64)
    y, ref = inr(params, t, buffers), inr.forward_complex(params, t.expand(2, -1), buffers)
    assert torch.allclose(y, ref, rtol=1e-10, atol=1e-10) and y.abs().max() > 1e-3
    names = list(params)
    gy = torch.autograd.grad(y.square().sum(), [params[k] for k in names])
    gr = torch.autograd.grad(ref.square().sum(), [params[k] for k in names])
    for k, a, b in zip(names, gy, gr):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-9, atol=1e-10), k
    from fewsound.inr.wire import _gabor_planes

    z = torch.randn(2, 5, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: _gabor_planes(z, 3.0, 0.7), (z,))
    assert torch.autograd.gradcheck(lambda z: _gabor_planes(z, 3.0, 0.7, is_complex=False), (z,))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_wire_default_init_keeps_activations_finite_and_order_one(dtype):
    """At the defaults every layer's activations at init are finite and O(1) over a 1.5 s clip's coordinates
    (neither the Gaussian envelope zeroing them nor the exp(-omega Im z) factor blowing them up)."""
    from fewsound.inr.base import linear
    from fewsound.inr.wire import _complex_linear, _gabor_planes

    inr = build_inr("wire")
    c = inr.config
    params, buffers = inr.init(list(range(6)), dtype=dtype)
    t = coordinates(32_768, dtype=dtype)[::8].expand(6, -1)  # every 8th coordinate of a 1.5 s clip
    x = _gabor_planes(linear(t.unsqueeze(-1), params["w0"], params["b0"]), c.omega_0, c.s0, is_complex=False)
    for i in range(1, len(inr.dims)):
        h = x.shape[-1] // 2
        magnitude = torch.sqrt(x[..., :h] ** 2 + x[..., h:] ** 2)
        assert torch.isfinite(magnitude).all(), i
        assert 0.3 < magnitude.mean() < 3.0 and magnitude.max() < 20.0, (i, magnitude.mean(), magnitude.max())
        if i < len(inr.dims) - 1:
            x = _gabor_planes(_complex_linear(x, params[f"w{i}"], params[f"b{i}"]), c.omega_i, c.s0)
    y = inr(params, t, buffers)
    assert torch.isfinite(y).all() and 0.05 < y.std() < 5.0


def test_variants_change_the_function():
    t = coordinates(256, dtype=F64)
    for family, key, a, b in [
        ("siren", "hidden_init", "siren", "paper_code"),
        ("finer", "variant", "published", "paper_code"),
    ]:
        ia, ib = build_inr(family, **{key: a}), build_inr(family, **{key: b})
        pa, ba = ia.init([0], dtype=F64)
        pb, bb = ib.init([0], dtype=F64)
        assert not torch.allclose(ia(pa, t, ba), ib(pb, t, bb)), family
    # the paper code's SIREN init divides hidden weights by omega_0 = 2000 instead of omega_i = 30
    p_siren, _ = build_inr("siren").init([0])
    p_code, _ = build_inr("siren", hidden_init="paper_code").init([0])
    ratio = p_siren["w1"].abs().max() / p_code["w1"].abs().max()
    assert ratio == pytest.approx(2000 / 30, rel=0.05)


def test_finer_first_bias_scale():
    params, _ = build_inr("finer", first_bias_scale=5.0).init([0])
    assert 4.0 < params["b0"].abs().max() <= 5.0
    assert params["b1"].abs().max() <= 90**-0.5


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="inr.family"):
        build_inr("mlp")
    with pytest.raises(ConfigError, match="kan.grid"):
        build_inr("kan", grid=5)
    bad = [
        ("kan", {"grid_size": 0}, "kan.grid_size"),
        ("kan", {"spline_order": -1}, "kan.spline_order"),
        ("kan", {"widths": (48, 0)}, "kan.widths"),
        ("kan", {"grid_range": (1.0, -1.0)}, "kan.grid_range"),
        ("kan", {"implementation": "cuda"}, "kan.implementation"),
        ("kan", {"enable_scale_spline": "yes"}, "kan.enable_scale_spline"),
        ("nerf", {"encoding_length": 2.5}, "nerf.encoding_length"),
        ("siren", {"omega_0": -1.0}, "siren.omega_0"),
        ("siren", {"hidden_init": "xavier"}, "siren.hidden_init"),
        ("finer", {"variant": "v2"}, "finer.variant"),
        ("wire", {"s0": float("nan")}, "wire.s0"),
        ("rff", {"num_frequencies": 0}, "rff.num_frequencies"),
    ]
    for family, overrides, key in bad:
        with pytest.raises(ConfigError) as e:
            build_inr(family, **overrides)
        assert e.value.where == key, (family, overrides, e.value)


def test_build_from_config_and_lists():
    inr = build_inr("kan", widths=[24, 12, 6])  # lists (JSON, Tune, MLflow) become tuples
    # L = 10: (20*24 + 24*12 + 12*6 + 6*1) edges * (G + k + 2 = 14)
    assert inr.config.widths == (24, 12, 6) and inr.num_params() == 846 * 14
    again = build_inr(inr.config, grid_size=5)
    assert again.config.widths == (24, 12, 6) and again.config.grid_size == 5
    assert isinstance(again.config, KanConfig)
    with pytest.raises(ConfigError):
        build_inr(object())


# --- fast KAN == recursion -----------------------------------------------------------------------------------


def _probe_points(grid_size, order):
    g = knots(grid_size, order, dtype=F64)
    gen = torch.Generator().manual_seed(grid_size * 10 + order)
    span = float(g[-1] - g[0])
    inside = torch.rand(500, generator=gen, dtype=F64) * (span + 1.0) + float(g[0]) - 0.5
    return torch.cat(
        [
            inside,
            g,
            g + 1e-12,
            g - 1e-12,
            torch.nextafter(g, g + 1),
            torch.nextafter(g, g - 1),
            torch.tensor([-1.0, 1.0, -1e6, 1e6, -1e30, 1e30], dtype=F64),
        ]
    )


@pytest.mark.parametrize("order", [0, 1, 2, 3, 5, 7])
@pytest.mark.parametrize("grid_size", [1, 5, 10, 17])
def test_fast_basis_equals_recursion(grid_size, order):
    x = _probe_points(grid_size, order)
    fast = bspline_basis_fast(x, grid_size, order)
    ref = bspline_basis_recursion(x, knots(grid_size, order, dtype=F64), order)
    assert fast.shape == ref.shape == (len(x), grid_size + order)
    assert torch.allclose(fast, ref, rtol=0, atol=1e-12), (fast - ref).abs().max()
    # outside the extended knot range (and at its right end: half-open intervals) every basis is exactly 0
    g = knots(grid_size, order, dtype=F64)
    outside = (x < g[0]) | (x >= g[-1])
    assert outside.any() and (fast[outside] == 0).all()
    # partition of unity inside [a, b]
    inside = (x >= -1) & (x < 1)
    assert torch.allclose(fast[inside].sum(-1), torch.ones(int(inside.sum()), dtype=F64), atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("grid_size", [1, 10])
def test_fast_contraction_values_and_gradients_equal_recursion(grid_size, order):
    gen = torch.Generator().manual_seed(order)
    pts = _probe_points(grid_size, order)[:-2]  # +-1e30 make the recursion itself overflow to nan
    x = torch.cat([pts, torch.rand(60, generator=gen, dtype=F64) * 3 - 1.5])
    x = x[torch.randperm(len(x), generator=gen)][: (len(x) // 6) * 6].view(2, -1, 3).requires_grad_(True)
    coef = torch.randn(2, 4, 3, grid_size + order, generator=gen, dtype=F64, requires_grad=True)
    yf = spline_contract_fast(x, coef, grid_size, order, (-1.0, 1.0))
    yr = spline_contract_recursion(x, coef, grid_size, order, (-1.0, 1.0))
    assert torch.allclose(yf, yr, rtol=0, atol=1e-11)
    gy = torch.randn(yf.shape, generator=gen, dtype=F64)
    gxf, gcf = torch.autograd.grad(yf, (x, coef), gy)
    gxr, gcr = torch.autograd.grad(yr, (x, coef), gy)
    assert torch.allclose(gcf, gcr, rtol=0, atol=1e-10)
    # dL/dx: the recursion's derivative is one-sided at knots where the spline is only C^(k-1) (k = 1 kinks),
    # so compare away from knots for k = 1 and everywhere for k >= 2 (C^1 splines).
    g = knots(grid_size, order, dtype=F64)
    near_knot = (x.detach().unsqueeze(-1) - g).abs().min(-1).values < 1e-9
    mask = ~near_knot if order == 1 else torch.ones_like(near_knot)
    assert torch.allclose(gxf[mask], gxr[mask], rtol=1e-9, atol=1e-9)


def test_fast_contraction_gradcheck_and_tiling(monkeypatch):
    import fewsound.inr.kan as kan

    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 23, 3, generator=gen, dtype=F64) * 2.8 - 1.4).requires_grad_(True)
    coef = torch.randn(2, 2, 3, 12, generator=gen, dtype=F64, requires_grad=True)
    # tiny tiles and chunks (10 samples per chunk, 5 per tile here): 23 samples make 3 chunks, 5 tiles, ragged last ones
    monkeypatch.setattr(kan, "_TILE_ELEMENTS", 3 * 14 * 2 * 5)
    monkeypatch.setattr(kan, "_CHUNK_PAIRS", 2 * 3 * 10)
    assert torch.autograd.gradcheck(lambda a, c: spline_contract_fast(a, c, 10, 2, (-1.0, 1.0)), (x, coef))
    small = spline_contract_fast(x, coef, 10, 2, (-1.0, 1.0))
    monkeypatch.setattr(kan, "_TILE_ELEMENTS", 1 << 18)
    monkeypatch.setattr(kan, "_CHUNK_PAIRS", 1 << 14)
    assert torch.allclose(small, spline_contract_fast(x, coef, 10, 2, (-1.0, 1.0)), rtol=0, atol=1e-13)


@pytest.mark.parametrize("overrides", [{}, {"spline_order": 3, "grid_size": 5, "enable_scale_spline": False}])
def test_kan_model_fast_equals_recursion(overrides):
    fast = build_inr("kan", **overrides)
    ref = build_inr("kan", implementation="recursion", **overrides)
    params, buffers = fast.init([0, 1], dtype=F64)
    for p in params.values():
        p.requires_grad_(True)
    t = coordinates(700, dtype=F64)
    yf, yr = fast(params, t, buffers), ref(params, t, buffers)
    assert torch.allclose(yf, yr, rtol=0, atol=1e-11)
    names = list(params)
    gf = torch.autograd.grad(yf.square().sum(), [params[k] for k in names])
    gr = torch.autograd.grad(yr.square().sum(), [params[k] for k in names])
    for k, a, b in zip(names, gf, gr):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10), k


def test_kan_init_matches_efficient_kan_statistics():
    c = KanConfig()
    inr = build_inr("kan")
    params, _ = inr.init([0], dtype=F64)
    # base weight and scaler: kaiming_uniform(a=sqrt(5)) -> U(+-1/sqrt(in))
    assert params["bw0"].abs().max() <= 20**-0.5 and params["bw0"].abs().max() > 0.9 * 20**-0.5
    assert params["ss1"].abs().max() <= 48**-0.5
    # spline coefficients: the min-norm spline through noise of amplitude scale_noise / (2G) at the grid points
    points = knots(c.grid_size, c.spline_order, dtype=F64)[c.spline_order : c.spline_order + c.grid_size + 1]
    basis = bspline_basis_recursion(points, knots(c.grid_size, c.spline_order, dtype=F64), c.spline_order)
    values = torch.einsum("pc,oic->poi", basis, params["sw0"][0])
    assert values.abs().max() <= c.scale_noise / (2 * c.grid_size) + 1e-12
    assert values.abs().max() > 0.8 * c.scale_noise / (2 * c.grid_size)
    # no standalone scaler: scale_spline multiplies the coefficients instead
    p2, _ = build_inr("kan", enable_scale_spline=False, scale_spline=3.0).init([0], dtype=F64)
    assert "ss0" not in p2
    assert torch.allclose(p2["sw0"] / 3.0, build_inr("kan", enable_scale_spline=False).init([0], dtype=F64)[0]["sw0"])


def test_kan_layer_fast_equals_recursion_with_base_branch(monkeypatch):
    """The fused layer (SiLU branch in the same table) == SiLU(x) bw^T + recursion spline, values and all three
    gradients, for a pack of B = 3 with ragged chunks and tiles (tiny sizes force many of both)."""
    import fewsound.inr.kan as kan

    monkeypatch.setattr(kan, "_TILE_ELEMENTS", 4 * 3 * 15 * 7)
    monkeypatch.setattr(kan, "_CHUNK_PAIRS", 3 * 4 * 20)
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(3, 61, 4, generator=gen, dtype=F64) * 3.0 - 1.5).requires_grad_(True)
    bw = torch.randn(3, 5, 4, generator=gen, dtype=F64, requires_grad=True)
    coef = torch.randn(3, 5, 4, 12, generator=gen, dtype=F64, requires_grad=True)
    yf = kan_layer_fast(x, bw, coef, 10, 2, (-1.0, 1.0))
    yr = kan_layer_recursion(x, bw, coef, 10, 2, (-1.0, 1.0))
    assert torch.allclose(yf, yr, rtol=0, atol=1e-12)
    gy = torch.randn(yf.shape, generator=gen, dtype=F64)
    for a, b in zip(torch.autograd.grad(yf, (x, bw, coef), gy), torch.autograd.grad(yr, (x, bw, coef), gy)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    # clip b's output depends only on clip b's weights (the flat embedding_bag table offsets rows per clip)
    y1 = kan_layer_fast(x[1:2], bw[1:2], coef[1:2], 10, 2, (-1.0, 1.0))
    assert torch.allclose(y1[0], yf[1], rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, w, c: kan_layer_fast(a, w, c, 10, 2, (-1.0, 1.0)), (x[:2, :9], bw[:2], coef[:2])
    )


def test_kan_layer_fast_under_bf16_autocast():
    """Under CPU bfloat16 autocast the layer's two products take bfloat16 operands: output and gradients stay
    float32, within bfloat16 rounding (~2^-8 relative) of the float32 layer, and really differ from it."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.rand(2, 300, 6, generator=gen) * 2.2 - 1.1).requires_grad_(True)
    bw = torch.randn(2, 5, 6, generator=gen, requires_grad=True)
    coef = torch.randn(2, 5, 6, 12, generator=gen, requires_grad=True)
    gy = torch.randn(2, 300, 5, generator=gen)
    y32 = kan_layer_fast(x, bw, coef, 10, 2, (-1.0, 1.0))
    g32 = torch.autograd.grad(y32, (x, bw, coef), gy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = kan_layer_fast(x, bw, coef, 10, 2, (-1.0, 1.0))
    g16 = torch.autograd.grad(y16, (x, bw, coef), gy)
    assert y16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g16)
    scale = y32.abs().max()
    assert 0 < (y16 - y32).abs().max() < 2e-2 * scale
    assert 0 < (g16[0] - g32[0]).abs().max() < 2e-2 * g32[0].abs().max()  # dL/dx: a bfloat16 product
    for a, b in zip(g16[1:], g32[1:]):  # the table gradient stays float32
        torch.testing.assert_close(a, b)


def test_kan_fast_memory_is_one_tile():
    """The fast layer keeps its input and O(in) numbers per sample for backward: no [N, in, G + k] tensor."""
    inr = build_inr("kan")
    params, buffers = inr.init([0])
    for p in params.values():
        p.requires_grad_(True)
    n = 4096
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inr(params, coordinates(n), buffers)
    grid_plus_k = 12
    assert max(saved) < n * 20 * grid_plus_k  # the smallest dense basis (first layer) would be this big
    assert math.isclose(max(saved), n * 48, rel_tol=0.01)  # largest saved tensor: a layer input / activation
    # per layer: its input plus three [N, in] tensors (interval, fraction, sigmoid) -> well under 5 * N * sum(in)
    assert sum(saved) < 5 * n * (20 + 48 + 24 + 12)
