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
recursion over all G + k bases, materialising several [N, in, G + 2k] tensors per layer and keeping them all
for backward. On a uniform grid only k + 1 bases are non-zero at any x: with u = (x - t_0) / h, the interval
is m = floor(u) and the k + 1 values are fixed polynomials of the fractional position f = u - m (the uniform
B-spline's pieces, `_uniform_bspline_polynomials`, derived exactly from the recursion). `_SplineContract`
(a custom autograd.Function) walks N in small tiles: per tile it scatters those k + 1 values per input into
one reused, zeroed basis tile (a few hundred rows) and contracts it with the coefficients by a batched
matmul; backward re-derives the values (and their closed-form derivatives) per tile the same way. Autograd
keeps only the layer input, so memory no longer grows with N * in * (G + k), and the work is k + 1 scatters
plus BLAS instead of the recursion's O(k (G + 2k)) elementwise passes.
Outside the extended knot range, and at its right end (half-open intervals), every basis is zero, as in the
recursion; ties at knots fall as in the recursion to rounding (exactly for k = 0, where it matters).
`implementation="recursion"` is the straightforward dense formulation (`bspline_basis_recursion` + one bmm),
kept as the reference for the tests and the speed benchmark (benchmarks/kan_speed.py).
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
    implementation: str = "fast"  # "fast" (closed-form local basis, tiled) | "recursion" (reference)

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


class _Spline:
    """Closed-form evaluation of the k + 1 non-zero bases on one uniform grid, in a compact column layout.

    Column layout (W = G + k + 2 columns per input): basis j (0 .. G + k - 1) is column j + 1; columns 0 and
    W - 1 are "trash" columns whose coefficients are zero. x in knot interval m (t_m <= x < t_{m+1}; m = -1
    below t_0, m = G + 2k at or after t_{G+2k}) touches bases j = m - k + r, r = 0..k; a j outside
    0 .. G + k - 1 is sent to the trash column on its side. So outside the knot range every touched column is
    trash and the output and dL/dx are exactly zero there, without masks (several r may land on the same trash
    column; whichever value is written there is multiplied by a zero coefficient).
    """

    def __init__(self, grid_size: int, spline_order: int, grid_range, dtype, device):
        self.g, self.k = grid_size, spline_order
        self.a, b = grid_range
        self.h = (b - self.a) / grid_size
        self.width = grid_size + spline_order + 2
        grid = knots(grid_size, spline_order, grid_range, dtype=dtype, device=device)
        inf = torch.full((1,), float("inf"), dtype=dtype, device=device)
        self.ext = torch.cat([-inf, grid, inf])  # ext[m + 1] = t_m for m = -1 .. G + 2k + 1
        self.poly_list = [list(c) for c in _uniform_bspline_polynomials(spline_order)]
        # d/dx = (d/df) / h
        self.dpoly_list = [[p * c[p] / self.h for p in range(1, len(c))] for c in self.poly_list]
        self.shift = torch.arange(spline_order + 1, device=device) + (1 - spline_order)

    def local(self, x: Tensor, with_derivative: bool = False):
        """x: [...] -> idx: [..., k + 1] int64 columns; w: [..., k + 1] values; dw: [..., k + 1] dw/dx or None."""
        k, n_intervals = self.k, self.g + 2 * self.k
        u = (x * (1.0 / self.h)).add_(k - self.a / self.h).clamp_(-1.0, float(n_intervals))
        m = u.floor().long()
        if k == 0:
            # (x - a)/h can round across a knot. For k >= 1 the bases are continuous there, so either side
            # gives the same values to rounding; for the step functions of k = 0 one comparison against the
            # very knot values the recursion uses puts x in the recursion's half-open interval [t_m, t_{m+1}).
            m -= (x < self.ext[m + 1]).long()
            m += (x >= self.ext[m + 2]).long()
        # Fractional position; clamped only to keep far-away x finite (their columns are trash anyway).
        f = (u - m).clamp_(0.0, 1.0)
        idx = (m.unsqueeze(-1) + self.shift).clamp_(0, self.width - 1)
        w = _horner(self.poly_list, f)
        dw = None
        if with_derivative:
            dw = torch.zeros_like(w) if k == 0 else _horner(self.dpoly_list, f)
        return idx, w, dw


def _horner(poly: list[list[float]], f: Tensor) -> Tensor:
    """The k + 1 polynomials poly[r] (coefficients of f^0, f^1, ...) at f: [...] -> [..., k + 1].

    One scalar Horner chain per r on contiguous [...] tensors, written into column r of the result: about
    twice as fast on CPU as broadcasting [..., 1] against [k + 1] (a size-(k+1) innermost loop).
    """
    out = f.new_empty(*f.shape, len(poly))
    for r, c in enumerate(poly):
        if len(c) == 1:
            out[..., r] = c[0]
            continue
        acc = torch.mul(f, c[-1]).add_(c[-2])
        for coef in reversed(c[:-2]):
            acc.mul_(f).add_(coef)
        out[..., r] = acc
    return out


def bspline_basis_fast(x: Tensor, grid_size: int, spline_order: int, grid_range=(-1.0, 1.0)) -> Tensor:
    """Dense basis [..., G + k] from the closed-form local values (values only, no autograd through x).

    For tests and plots; the KAN layer never builds it for the whole input (see `_SplineContract`).
    """
    spline = _Spline(grid_size, spline_order, grid_range, x.dtype, x.device)
    idx, w, _ = spline.local(x.detach())
    dense = torch.zeros(*x.shape, spline.width, dtype=x.dtype, device=x.device).scatter_(-1, idx, w)
    return dense[..., 1 : 1 + grid_size + spline_order]


# Tiling over N. Local values (index math and polynomials, many small elementwise ops) are computed per
# chunk of about _CHUNK_PAIRS (n, i) pairs, large enough to amortise torch's per-op overhead; the dense basis is
# scattered and contracted per tile of about _TILE_ELEMENTS entries (1 MB in float32), small enough to stay in
# cache. Peak extra memory is one chunk's local values plus one tile, whatever N is.
_CHUNK_PAIRS = 1 << 14
_TILE_ELEMENTS = 1 << 18


def _tiles(x: Tensor, spline: _Spline, with_derivative: bool):
    """Yield (start, rows, idx, w, dw) over row tiles of x [B, N, in]; local values computed per chunk."""
    bsz, n, n_in = x.shape
    tile = max(1, min(n, _TILE_ELEMENTS // (bsz * n_in * spline.width)))
    chunk = tile * max(1, _CHUNK_PAIRS // (tile * bsz * n_in))
    for c in range(0, n, chunk):
        idx, w, dw = spline.local(x[:, c : c + chunk], with_derivative)
        for s in range(0, idx.shape[1], tile):
            sl = slice(s, s + tile)
            yield c + s, idx[:, sl].shape[1], idx[:, sl], w[:, sl], (dw[:, sl] if dw is not None else None)


class _SplineContract(torch.autograd.Function):
    """y[b, n, o] = sum_{i, c} coef[b, o, i, c] B_c(x[b, n, i]), tiled over N; saves only x and coef.

    Per tile of rows, the k + 1 local values per input (closed form) are scattered into one reused, zeroed
    [B, rows, in * W] basis tile, which a batched matmul contracts with the coefficient table. Peak memory is
    one tile (not several [N, in, G + 2k] tensors per recursion level as in the reference) and autograd keeps
    only the layer input. Gradients: d coef = basis^T dy (bmm); dx[n, i] = sum_r w'_r(x) * (dy coef)[n, i, idx_r]
    (bmm, then a gather of k + 1 columns). First-order only (no double backward).
    """

    @staticmethod
    def forward(ctx, x, coef, grid_size, spline_order, grid_range):
        bsz, n, n_in = x.shape
        spline = _Spline(grid_size, spline_order, grid_range, x.dtype, x.device)
        table = _table(coef, spline).transpose(1, 2)  # [B, in * W, out]
        y = x.new_empty(bsz, n, coef.shape[1])
        buf = None
        for s, r, idx, w, _ in _tiles(x, spline, with_derivative=False):
            if buf is None:
                buf = x.new_zeros(bsz, r, n_in, spline.width)
            basis = buf[:, :r]
            basis.scatter_(-1, idx, w)
            if bsz == 1:  # the tile of y is contiguous: bmm writes it in place
                torch.bmm(basis.view(bsz, r, -1), table, out=y[:, s : s + r])
            else:
                y[:, s : s + r] = torch.bmm(basis.view(bsz, r, -1), table)
            basis.zero_()
        ctx.save_for_backward(x, coef)
        ctx.spline = (grid_size, spline_order, grid_range)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, coef = ctx.saved_tensors
        grid_size, spline_order, grid_range = ctx.spline
        bsz, n, n_in = x.shape
        n_out = coef.shape[1]
        spline = _Spline(grid_size, spline_order, grid_range, x.dtype, x.device)
        table = _table(coef, spline)  # [B, out, in * W]
        gy = gy.contiguous()
        need_x, need_coef = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = x.new_empty(x.shape) if need_x else None
        gtable = x.new_zeros(bsz, n_out, n_in * spline.width) if need_coef else None
        buf = None
        for s, r, idx, w, dw in _tiles(x, spline, with_derivative=need_x):
            gys = gy[:, s : s + r]
            if need_coef:
                if buf is None:
                    buf = x.new_zeros(bsz, r, n_in, spline.width)
                basis = buf[:, :r]
                basis.scatter_(-1, idx, w)
                gtable.baddbmm_(gys.transpose(1, 2), basis.view(bsz, r, -1))
                basis.zero_()
            if need_x:
                d = torch.bmm(gys, table).view(bsz, r, n_in, spline.width)  # dL/d(basis column)
                if bsz == 1:  # contiguous slice: write in place
                    torch.linalg.vecdot(d.gather(-1, idx), dw, out=gx[:, s : s + r])
                else:
                    gx[:, s : s + r] = torch.linalg.vecdot(d.gather(-1, idx), dw)
        gcoef = None
        if need_coef:
            gcoef = gtable.view(bsz, n_out, n_in, spline.width)[..., 1 : 1 + grid_size + spline_order]
        return gx, gcoef, None, None, None


def _table(coef: Tensor, spline: _Spline) -> Tensor:
    """coef [B, out, in, G + k] -> [B, out, in * W] with zero trash columns on both sides of each input."""
    bsz, n_out, n_in, _ = coef.shape
    return F.pad(coef, (1, 1)).reshape(bsz, n_out, n_in * spline.width)


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
