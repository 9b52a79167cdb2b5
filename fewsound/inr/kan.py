"""KAN: the NeRF positional encoding followed by Kolmogorov-Arnold layers (efficient-kan semantics).

Each layer maps x [B, N, in] to [B, N, out] with one learnable function per edge (i -> o):

    y_o = sum_i  bw[o, i] * SiLU(x_i)  +  ss[o, i] * sum_c sw[o, i, c] * B_c(x_i)

B_c are the G + k B-splines of order k on ONE fixed uniform grid of G intervals over [a, b] = [-1, 1], extended
by k knots on each side: knots t_j = a + (j - k) h, h = (b - a) / G, j = 0 .. G + 2k. There is no grid update,
no activation between layers, and the last layer is a KAN layer too. Per edge: G + k spline coefficients `sw`,
one base weight `bw` and (when `enable_scale_spline`) one standalone spline scaler `ss`, so a layer has
in * out * (G + k + 2) parameters. Table 1: L = 10 (20 encoding features), widths [48, 24, 12], G = 10, k = 2
-> 2,412 edges * 14 = 33,768. Ablation base: L = 8 -> 31,080.

Init (efficient-kan's, re-derived): bw ~ kaiming_uniform(a = sqrt(5) * scale_base); sw = the minimum-norm
least-squares spline through uniform noise (rand - 1/2) * scale_noise / G at the G + 1 grid points (times
scale_spline when there is no standalone scaler); ss ~ kaiming_uniform(a = sqrt(5) * scale_spline). So
`scale_spline` changes an init gain; `enable_scale_spline` adds the scaler parameters.

Fast path (`implementation="fast"`, default). The paper's code evaluates the basis with the Cox-de Boor
recursion over all G + k bases, materialising several [N, in, G + 2k] tensors per layer and keeping them for
backward. On a uniform grid only k + 1 bases are non-zero at any x: with u = (x - t_0) / h, the interval is
m = floor(u) and the k + 1 values are fixed polynomials of the fractional position f = u - m (the uniform
B-spline's pieces, `_uniform_bspline_polynomials`). The layer then is a sparse product: output row (b, n)
sums in * (k + 1) rows of the coefficient table, weighted by those values - exactly `F.embedding_bag` with
per-sample weights, which never builds the dense basis. Outside the extended knot range, and at its right end
(half-open intervals), every basis is zero, as in the recursion. `implementation="recursion"` is the
straightforward dense formulation (`bspline_basis_recursion`), kept as the reference for tests and the
speed benchmark.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
import torch.nn.functional as F

from fewsound.errors import ConfigError
from fewsound.inr.base import (
    INR,
    ParamSpec,
    check_bool,
    check_choice,
    check_positive,
    check_widths,
    kaiming_uniform_bound,
    linear,
    mlp_dims,
    nerf_frequencies,
    positional_encoding,
    uniform,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class KanConfig:
    family: ClassVar[str] = "kan"
    encoding_length: int = 10  # L: NeRF positional encoding, 2L features
    widths: tuple[int, ...] = (48, 24, 12)  # hidden KAN layer widths; the output layer (-> 1) is added
    grid_size: int = 10  # G intervals over grid_range
    spline_order: int = 2  # k
    grid_range: tuple[float, float] = (-1.0, 1.0)
    enable_scale_spline: bool = True  # standalone spline scaler ss (one per edge)
    scale_noise: float = 0.1
    scale_base: float = 1.0
    scale_spline: float = 1.0
    implementation: str = "fast"  # "fast" (closed-form local basis + embedding_bag) | "recursion" (reference)

    def __post_init__(self):
        check_positive(self, "encoding_length", integer=True)
        check_widths(self)
        check_positive(self, "grid_size", integer=True)
        check_positive(self, "spline_order", integer=True, allow_zero=True)
        r = self.grid_range
        if not (isinstance(r, tuple) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r) and r[0] < r[1]):
            raise ConfigError("kan.grid_range", f"must be two numbers (low, high) with low < high, got {r!r}")
        check_bool(self, "enable_scale_spline")
        check_positive(self, "scale_noise", allow_zero=True)
        check_positive(self, "scale_base", allow_zero=True)
        check_positive(self, "scale_spline", allow_zero=True)
        check_choice(self, "implementation", ("fast", "recursion"))


# --- B-spline basis: reference recursion and the closed-form local evaluation --------------------------------


def knots(grid_size: int, spline_order: int, grid_range=(-1.0, 1.0), dtype=torch.float32, device=None) -> Tensor:
    """Extended uniform knot vector [G + 2k + 1]: arange(-k, G + k + 1) * h + a."""
    a, b = grid_range
    h = (b - a) / grid_size
    return torch.arange(-spline_order, grid_size + spline_order + 1, dtype=dtype, device=device) * h + a


def bspline_basis_recursion(x: Tensor, grid: Tensor, spline_order: int) -> Tensor:
    """Reference: Cox-de Boor recursion over all bases, as in efficient-kan. x [..., in] -> [..., in, G + k].

    Order 0 is the indicator of the half-open interval [t_j, t_{j+1}); each order p then mixes neighbours.
    """
    g = grid
    xe = x.unsqueeze(-1)
    bases = ((xe >= g[:-1]) & (xe < g[1:])).to(x.dtype)
    for p in range(1, spline_order + 1):
        left = (xe - g[: -(p + 1)]) / (g[p:-1] - g[: -(p + 1)]) * bases[..., :-1]
        right = (g[p + 1 :] - xe) / (g[p + 1 :] - g[1:-p]) * bases[..., 1:]
        bases = left + right
    return bases


@functools.lru_cache(maxsize=None)
def _uniform_bspline_polynomials(k: int) -> tuple[tuple[float, ...], ...]:
    """M [k + 1][k + 1]: on one interval, the r-th non-zero uniform B-spline of order k is sum_p M[r][p] f^p.

    Derived (exactly, in rationals) from the recursion on a uniform grid: with the interval's values
    v_0..v_{p-1} of order p - 1, order p has n_r = ((f + p - r) v_{r-1} + (r + 1 - f) v_r) / p for r = 0..p
    (v_{-1} = v_p = 0). Order 0 is v_0 = 1. Entry r belongs to basis j = m - k + r.
    """
    polys = [[Fraction(1)]]  # polys[r] = coefficients of f^0, f^1, ...
    for p in range(1, k + 1):
        new = []
        for r in range(p + 1):
            acc = [Fraction(0)] * (p + 1)
            if r - 1 >= 0:  # (f + p - r) * v_{r-1}
                for e, c in enumerate(polys[r - 1]):
                    acc[e] += (p - r) * c
                    acc[e + 1] += c
            if r < p:  # (r + 1 - f) * v_r
                for e, c in enumerate(polys[r]):
                    acc[e] += (r + 1) * c
                    acc[e + 1] -= c
            new.append([c / p for c in acc])
        polys = new
    return tuple(tuple(float(c) for c in poly) for poly in polys)


def _local_values(x: Tensor, grid_size: int, spline_order: int, grid_range, with_derivative: bool):
    """Interval index and the k + 1 non-zero basis values (and d/dx) at each x, in closed form.

    x: [...] -> m: [...] int64, the interval [t_m, t_{m+1}) holding x (searchsorted on the same knot tensor as
    the recursion, so ties at knots fall exactly as there), clamped into 0 .. G + 2k - 1;
    w: [..., k + 1], w[..., r] = value of basis j = m - k + r, zero outside [t_0, t_{G+2k});
    dw: [..., k + 1] = dw/dx (None unless asked).
    """
    k = spline_order
    a, b = grid_range
    h = (b - a) / grid_size
    n_intervals = grid_size + 2 * k
    grid = knots(grid_size, spline_order, grid_range, dtype=x.dtype, device=x.device)
    m = torch.searchsorted(grid, x.detach().contiguous(), right=True) - 1  # -1 below t_0, G + 2k at/after the end
    inside = ((m >= 0) & (m < n_intervals)).to(x.dtype).unsqueeze(-1)
    m = m.clamp_(0, n_intervals - 1)
    # Fractional position; within rounding of [0, 1) because m comes from the knots, and the pieces are
    # continuous there (k >= 1), so this matches the recursion to machine precision.
    f = ((x.detach() - a) / h + k - m.to(x.dtype)).unsqueeze(-1)
    poly = torch.tensor(_uniform_bspline_polynomials(k), dtype=x.dtype, device=x.device)  # [r, power]
    w = poly[:, k].expand(*x.shape, k + 1)
    for power in range(k - 1, -1, -1):  # Horner over all k + 1 pieces at once
        w = w * f + poly[:, power]
    w = w * inside
    if not with_derivative:
        return m, w, None
    if k == 0:
        return m, w, torch.zeros_like(w)
    dpoly = poly[:, 1:] * torch.arange(1, k + 1, dtype=x.dtype, device=x.device) / h  # d/dx = d/df / h
    dw = dpoly[:, k - 1].expand(*x.shape, k + 1)
    for power in range(k - 2, -1, -1):
        dw = dw * f + dpoly[:, power]
    return m, w, dw * inside


def bspline_basis_fast(x: Tensor, grid_size: int, spline_order: int, grid_range=(-1.0, 1.0)) -> Tensor:
    """Dense basis [..., G + k] from the closed-form local values (values only, no autograd through x).

    For tests and plots; the layer never builds the whole dense basis (see `_SplineContract`).
    """
    m, w, _ = _local_values(x, grid_size, spline_order, grid_range, with_derivative=False)
    return _scatter_dense(m, w, grid_size, spline_order)


def _scatter_dense(m: Tensor, w: Tensor, grid_size: int, spline_order: int) -> Tensor:
    """[..., k + 1] local values at interval m -> dense [..., G + k] (bases j = m - k + r outside 0..G+k-1 dropped)."""
    k = spline_order
    n_bases = grid_size + k
    j = m.unsqueeze(-1) - k + torch.arange(k + 1, device=m.device)
    valid = (j >= 0) & (j < n_bases)
    dense = torch.zeros(*m.shape, n_bases, dtype=w.dtype, device=w.device)
    # Invalid slots are redirected to index 0 with weight 0, so scatter_add leaves the dense basis unchanged.
    return dense.scatter_add_(-1, torch.where(valid, j, 0), torch.where(valid, w, 0.0))


def _gather_local(dense: Tensor, m: Tensor, grid_size: int, spline_order: int) -> Tensor:
    """Inverse pairing of `_scatter_dense`: dense [..., G + k] -> [..., k + 1] at bases m - k + r (0 if invalid)."""
    k = spline_order
    j = m.unsqueeze(-1) - k + torch.arange(k + 1, device=m.device)
    valid = (j >= 0) & (j < grid_size + k)
    return torch.where(valid, dense.gather(-1, torch.where(valid, j, 0)), 0.0)


# Rows of N per tile: bounds the transient dense basis tile [B, rows, in, G + k] (a few MB) whatever N is.
_TILE_ELEMENTS = 1 << 21


class _SplineContract(torch.autograd.Function):
    """y[b, n, o] = sum_{i, c} coef[b, o, i, c] B_c(x[b, n, i]), tiled over N; saves only x and coef.

    Forward and backward rebuild one tile of the basis at a time from the closed-form local values (k + 1
    scatters into a zeroed tile) and use batched matmuls, so peak memory is one tile, not [N, in, G + k]
    per recursion level as in the reference, and autograd keeps nothing but the layer input. Gradients:
    d coef = basis^T dy (bmm); dx[n, i] = sum_r w'_r(x) * (dy coef)[n, i, m - k + r] (bmm, then a gather).
    First-order only (no double backward).
    """

    @staticmethod
    def forward(ctx, x, coef, grid_size, spline_order, grid_range):
        bsz, n, n_in = x.shape
        n_out = coef.shape[1]
        flat = coef.reshape(bsz, n_out, -1)  # [B, out, in * (G + k)]
        rows = _tile_rows(n, n_in * (grid_size + spline_order) * bsz)
        y = x.new_empty(bsz, n, n_out)
        for s in range(0, n, rows):
            xs = x[:, s : s + rows]
            m, w, _ = _local_values(xs, grid_size, spline_order, grid_range, with_derivative=False)
            basis = _scatter_dense(m, w, grid_size, spline_order).reshape(bsz, xs.shape[1], -1)
            y[:, s : s + rows] = torch.bmm(basis, flat.transpose(1, 2))
        ctx.save_for_backward(x, coef)
        ctx.spline = (grid_size, spline_order, grid_range)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, coef = ctx.saved_tensors
        grid_size, spline_order, grid_range = ctx.spline
        bsz, n, n_in = x.shape
        n_out = coef.shape[1]
        flat = coef.reshape(bsz, n_out, -1)
        gy = gy.contiguous()
        need_x, need_coef = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.empty_like(x) if need_x else None
        gflat = torch.zeros_like(flat) if need_coef else None
        rows = _tile_rows(n, n_in * (grid_size + spline_order) * bsz)
        for s in range(0, n, rows):
            xs, gys = x[:, s : s + rows], gy[:, s : s + rows]
            m, w, dw = _local_values(xs, grid_size, spline_order, grid_range, with_derivative=need_x)
            if need_coef:
                basis = _scatter_dense(m, w, grid_size, spline_order).reshape(bsz, xs.shape[1], -1)
                gflat.baddbmm_(gys.transpose(1, 2), basis)
            if need_x:
                d = torch.bmm(gys, flat).reshape(bsz, xs.shape[1], n_in, -1)  # dL/dB_c per (n, i, c)
                gx[:, s : s + rows] = (_gather_local(d, m, grid_size, spline_order) * dw).sum(-1)
        return gx, (gflat.view_as(coef) if need_coef else None), None, None, None


def _tile_rows(n: int, per_row: int) -> int:
    return max(1, min(n, _TILE_ELEMENTS // max(per_row, 1)))


def spline_contract_fast(x: Tensor, coef: Tensor, grid_size: int, spline_order: int, grid_range) -> Tensor:
    """x: [B, N, in], coef: [B, out, in, G + k] -> [B, N, out] (closed-form local basis, tiled, custom backward)."""
    return _SplineContract.apply(x.contiguous(), coef.contiguous(), grid_size, spline_order, tuple(grid_range))


def spline_contract_recursion(x: Tensor, coef: Tensor, grid_size: int, spline_order: int, grid_range) -> Tensor:
    """Reference formulation (the paper code's): dense recursion basis, then one bmm. Same shapes as the fast one."""
    bsz, n, n_in = x.shape
    grid = knots(grid_size, spline_order, grid_range, dtype=x.dtype, device=x.device)
    bases = bspline_basis_recursion(x, grid, spline_order)  # [B, N, in, G + k]
    return torch.bmm(bases.reshape(bsz, n, -1), coef.reshape(bsz, coef.shape[1], -1).transpose(1, 2))


_CONTRACT = {"fast": spline_contract_fast, "recursion": spline_contract_recursion}


class Kan(INR):
    name = "kan"
    Config = KanConfig

    @property
    def dims(self):
        return mlp_dims(2 * self.config.encoding_length, self.config.widths)

    def param_specs(self):
        c = self.config
        specs = {}
        for i, (n_in, n_out) in enumerate(self.dims):
            specs[f"bw{i}"] = ParamSpec((n_out, n_in))
            specs[f"sw{i}"] = ParamSpec((n_out, n_in, c.grid_size + c.spline_order))
            if c.enable_scale_spline:
                specs[f"ss{i}"] = ParamSpec((n_out, n_in))
        return specs

    def buffer_specs(self):
        return {"freq": ParamSpec((self.config.encoding_length,))}

    def init_one(self, gen, dtype):
        c = self.config
        g, k = c.grid_size, c.spline_order
        # Minimum-norm least squares through the G + 1 grid points (G + 1 equations, G + k unknowns).
        points = knots(g, k, c.grid_range, dtype=torch.float64)[k : k + g + 1]
        design = bspline_basis_recursion(points.unsqueeze(-1), knots(g, k, c.grid_range, torch.float64), k)[:, 0]
        solve = torch.linalg.pinv(design)  # [G + k, G + 1]
        params = {}
        for i, (n_in, n_out) in enumerate(self.dims):
            params[f"bw{i}"] = uniform(gen, (n_out, n_in), kaiming_uniform_bound(n_in, math.sqrt(5) * c.scale_base), dtype)
            noise = (torch.rand(g + 1, n_in, n_out, generator=gen, dtype=torch.float64) - 0.5) * c.scale_noise / g
            sw = torch.einsum("cg,gio->oic", solve, noise)
            if not c.enable_scale_spline:
                sw = sw * c.scale_spline
            params[f"sw{i}"] = sw.to(dtype)
            if c.enable_scale_spline:
                bound = kaiming_uniform_bound(n_in, math.sqrt(5) * c.scale_spline)
                params[f"ss{i}"] = uniform(gen, (n_out, n_in), bound, dtype)
        return params, {"freq": nerf_frequencies(c.encoding_length, dtype)}

    def forward(self, params, t, buffers):
        c = self.config
        contract = _CONTRACT[c.implementation]
        x = positional_encoding(t, buffers["freq"])
        for i in range(len(self.dims)):
            coef = params[f"sw{i}"]
            if c.enable_scale_spline:
                coef = coef * params[f"ss{i}"].unsqueeze(-1)
            x = linear(F.silu(x), params[f"bw{i}"], None) + contract(x, coef, c.grid_size, c.spline_order, c.grid_range)
        return x.squeeze(-1)
