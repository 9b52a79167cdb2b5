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
B-spline's pieces, `_uniform_bspline_polynomials`, derived exactly from the recursion). `_KanLayer` (a custom
autograd.Function) does a whole layer, SiLU branch included: the layer's weights form one table with W = G + k + 3
rows per input (base weight, spline coefficients, zero "trash" rows); every (n, i) touches k + 2 of them (`_Layout`).
Forward, per chunk of N: those (row, value) pairs feed one `embedding_bag` (sum with per-sample weights), which
contracts only the non-zero terms. Backward, per chunk: the pairs are rebuilt from the kept interval / fraction /
sigmoid, scattered per cache-sized tile into one reused dense basis for the table gradient (baddbmm), and dL/dx
is gathered from dy table^T (bmm). All per-chunk temporaries live in buffers allocated once per call (fresh
multi-MB tensors per chunk cost more in page faults than the arithmetic). Autograd keeps the layer input plus
12 bytes per (n, i), so memory grows with N * in, not N * in * (G + k). Its speed and memory against an
independent dense implementation: benchmarks/fit_step.py (whole fit steps) and benchmarks/kan_speed.py.
Inside a CPU/CUDA autocast region (FitConfig.precision "bf16") the two products - the forward embedding_bag and
the backward's dL/dx bmm - take operands in the autocast dtype (accumulating in float32); the local basis, the
table gradient, the layer's output and dL/dx stay in x's dtype. Tracing stops at the layer under torch.compile.
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


class _Layout:
    """Closed-form local evaluation of a KAN layer's terms on one uniform grid, in a compact table layout.

    Input i owns W = G + k + 3 consecutive rows of the layer's table [in * W, out]: row 0 holds the base weights
    bw[:, i] (its term is SiLU(x_i)), rows 2 .. G + k + 1 the spline coefficients of bases j = 0 .. G + k - 1,
    and rows 1 and W - 1 are "trash" rows of zeros. Each (n, i) touches S = k + 2 rows ("slots"): slot 0 is
    the base row with value SiLU(x); slot 1 + r is basis j = m - k + r (x in knot interval m: t_m <= x < t_{m+1};
    m = -1 below t_0, m = G + 2k at or after t_{G+2k}), row j + 2, with value the r-th uniform B-spline
    polynomial of the fractional position f. A j outside 0 .. G + k - 1 goes to the trash row on its side, so
    outside the knot range the spline part of the output and of dL/dx is exactly zero, without masks.
    Slots are laid out slot-major, [..., S, in]: every elementwise op writes one contiguous plane per slot, and
    the order of terms inside a sum does not matter to the contraction.
    """

    def __init__(self, grid_size: int, spline_order: int, grid_range, dtype, device):
        self.g, self.k = grid_size, spline_order
        a, b = grid_range
        h = (b - a) / grid_size
        self.scale, self.offset = 1.0 / h, spline_order - a / h  # u = x / h + k - a / h: knot-interval units
        self.width = grid_size + spline_order + 3
        self.slots = spline_order + 2
        grid = knots(grid_size, spline_order, grid_range, dtype=dtype, device=device)
        inf = torch.full((1,), float("inf"), dtype=dtype, device=device)
        self.ext = torch.cat([-inf, grid, inf])  # ext[m + 1] = t_m for m = -1 .. G + 2k + 1
        self.poly = [list(c) for c in _uniform_bspline_polynomials(spline_order)]
        self.dpoly = [[p * c[p] / h for p in range(1, len(c))] for c in self.poly]  # d/dx = (d/df) / h
        # slot 1 + r: row = clamp(m + c_r, 1, W - 1) = clamp(m, 1 - c_r, W - 1 - c_r) + c_r, c_r = 2 - k + r
        self.shifts = [2 - spline_order + r for r in range(spline_order + 1)]

    def rows(self, bsz: int, n_in: int, device, per_clip: bool) -> list[Tensor]:
        """First table row of each input, [B, 1, in]: (b * in + i) * W if per_clip (one flat table for all B clips,
        as embedding_bag wants it), else i * W (each clip's own [in * W] columns). Returned as [that] + [that + c_r
        for each spline slot r], the offsets `local` adds to each slot plane."""
        i = torch.arange(n_in, dtype=torch.int32, device=device)
        if per_clip:
            i = i + n_in * torch.arange(bsz, dtype=torch.int32, device=device).view(-1, 1)
        first = (i * self.width).view(-1, 1, n_in).expand(bsz, 1, n_in)
        return [first] + [first + c for c in self.shifts]

    def local(
        self,
        x: Tensor,
        rows: list[Tensor],
        with_derivative: bool = False,
        work: "_Work | None" = None,
        keep: "tuple[Tensor, Tensor, Tensor] | None" = None,
        reuse: bool = False,
    ):
        """x [B, r, in] -> idx [B, r, S, in] table rows (int32, or int64 if `work` says so); w [B, r, S, in]
        values; dw [B, r, S, in] d(values)/dx, or None.

        With `work`, every result and temporary is a view of its reused buffers (valid until the next call):
        fresh multi-MB tensors per chunk would cost more in page faults than the arithmetic itself.
        keep = (interval m int32, fractional position f, sigmoid(x)), each [B, r, in]: written here (the forward
        keeps them for backward, 12 bytes per (n, i)), or with `reuse` read instead of recomputed.
        """
        k, n_intervals = self.k, self.g + 2 * self.k
        bsz, r, n_in = x.shape
        work = work or _Work(x.numel(), self.slots, x.dtype, x.device, with_derivative)
        mi, f, sig = keep if keep is not None else (work.view(n, x.shape) for n in ("mi", "f", "sig"))
        if not reuse:
            u, m = work.view("u", x.shape), work.view("m", x.shape)
            torch.mul(x, self.scale, out=u).add_(self.offset).clamp_(-1.0, float(n_intervals))
            torch.floor(u, out=m)
            mi.copy_(m)
            if k == 0:
                # (x - a)/h can round across a knot. For k >= 1 the bases are continuous there, so either side
                # gives the same values to rounding; for the step functions of k = 0 one comparison against the
                # very knot values the recursion uses puts x in the recursion's half-open interval [t_m, t_{m+1}).
                mi -= (x < self.ext[mi + 1]).int()
                mi += (x >= self.ext[mi + 2]).int()
                m.copy_(mi)
            torch.sub(u, m, out=f)  # in [0, 1): u was clamped, so far-away x stay finite (their rows are trash)
            torch.sigmoid(x, out=sig)
        shape = (bsz, r, self.slots, n_in)
        idx, w = work.view("idx", shape), work.view("w", shape)
        if work.base_shape != shape:  # same view as the last chunk: its base plane is still there
            idx[:, :, 0] = rows[0]
            work.base_shape = shape
        clamped = work.view("mc", x.shape)
        for r_, c_r in enumerate(self.shifts):  # per contiguous plane: faster than broadcasting over slots
            torch.clamp(mi, 1 - c_r, self.width - 1 - c_r, out=clamped)
            torch.add(clamped, rows[1 + r_], out=idx[:, :, 1 + r_])
        torch.mul(x, sig, out=w[:, :, 0])  # SiLU
        _horner_into(self.poly, f, w[:, :, 1:])
        dw = None
        if with_derivative:
            dw = work.view("dw", shape)
            # SiLU'(x) = s + x s (1 - s) = s + SiLU(x) (1 - s)
            tmp = work.view("tmp", x.shape)
            torch.mul(sig, -1.0, out=tmp).add_(1.0)
            torch.addcmul(sig, w[:, :, 0], tmp, out=dw[:, :, 0])
            if k == 0:
                dw[:, :, 1:].zero_()
            else:
                _horner_into(self.dpoly, f, dw[:, :, 1:])
        return idx, w, dw


class _Work:
    """Flat buffers for `_Layout.local` on up to `pairs` (b, n, i) pairs, allocated once per layer call."""

    def __init__(self, pairs: int, slots: int, dtype, device, with_derivative: bool, long_index: bool = False):
        sizes = {"u": pairs, "m": pairs, "f": pairs, "sig": pairs, "tmp": pairs, "w": pairs * slots}
        if with_derivative:
            sizes["dw"] = pairs * slots
        self.buf = {name: torch.empty(size, dtype=dtype, device=device) for name, size in sizes.items()}
        self.buf["mi"] = torch.empty(pairs, dtype=torch.int32, device=device)
        self.buf["mc"] = torch.empty(pairs, dtype=torch.int32, device=device)
        # int32 rows for embedding_bag (forward); int64 for backward, whose scatter_/gather would otherwise convert
        # int32 indices to int64 on every call
        self.buf["idx"] = torch.empty(pairs * slots, dtype=torch.long if long_index else torch.int32, device=device)
        self.base_shape: tuple[int, ...] | None = (
            None  # shape of the idx view whose base plane (constant rows) is already written
        )

    def view(self, name: str, shape) -> Tensor:
        """The first prod(shape) elements of buffer `name`, as a contiguous tensor of that shape."""
        return self.buf[name][: math.prod(shape)].view(shape)


def _horner_into(poly: list[list[float]], f: Tensor, out: Tensor) -> None:
    """out[:, :, r] = the polynomial poly[r] (coefficients of f^0, f^1, ...) at f [B, r, in], for each slot plane r.

    One scalar Horner chain per plane, in place: ops on contiguous planes with scalar operands run several times
    faster on CPU than one chain over all planes with broadcast [k + 1, 1] coefficients.
    """
    for r, c in enumerate(poly):
        plane = out[:, :, r]
        if len(c) == 1:
            plane.fill_(c[0])
            continue
        torch.mul(f, c[-1], out=plane).add_(c[-2])
        for coef in reversed(c[:-2]):
            plane.mul_(f).add_(coef)


def bspline_basis_fast(x: Tensor, grid_size: int, spline_order: int, grid_range=(-1.0, 1.0)) -> Tensor:
    """Dense basis [..., G + k] from the closed-form local values (values only, no autograd through x).

    For tests and plots; the KAN layer never builds it for the whole input (see `_KanLayer`).
    """
    lay = _Layout(grid_size, spline_order, grid_range, x.dtype, x.device)
    flat = x.detach().reshape(1, -1, 1)
    idx, w, _ = lay.local(flat, lay.rows(1, 1, x.device, per_clip=False))
    dense = torch.zeros(flat.shape[1], lay.width, dtype=x.dtype, device=x.device)
    dense.scatter_(-1, idx[0, :, 1:, 0], w[0, :, 1:, 0])
    return dense[:, 2 : 2 + grid_size + spline_order].reshape(*x.shape, grid_size + spline_order)


# Chunking over N. Forward: local values for about _CHUNK_PAIRS (b, n, i) pairs at a time (int64 rows and values,
# ~40 B per pair for k = 2), large enough to amortise torch's per-op overhead, then one embedding_bag. Backward:
# the same chunks, cut into tiles of about _TILE_ELEMENTS entries of the dense [B, rows, in * W] basis, small
# enough to stay in cache (1 MB in float32). Peak extra memory is one chunk plus one tile, whatever N is.
_CHUNK_PAIRS = 1 << 16
_TILE_ELEMENTS = 1 << 18
_CUDA_SCALE = 64  # on a GPU, far larger chunks and tiles: kernel launches, not caches, are what costs there


def _chunk_pairs(device) -> int:
    return _CHUNK_PAIRS * (_CUDA_SCALE if torch.device(device).type == "cuda" else 1)


def _tile_elements(device) -> int:
    return _TILE_ELEMENTS * (_CUDA_SCALE if torch.device(device).type == "cuda" else 1)


def _chunks(n: int, rows_per_chunk: int):
    for c in range(0, n, rows_per_chunk):
        yield c, min(rows_per_chunk, n - c)


class _KanLayer(torch.autograd.Function):
    """y[b, n, o] = sum_i bw[b, o, i] SiLU(x[b, n, i]) + sum_{i, c} coef[b, o, i, c] B_c(x[b, n, i]).

    Forward: per chunk of rows, the S = k + 2 (row, value) pairs of every (n, i) (`_Layout`) feed one
    `embedding_bag` (sum mode, per-sample weights) over the flat [B * in * W, out] table: the k + 1 non-zero
    bases and the SiLU term are contracted with gathered table rows, never with the zeros of a dense basis.
    Backward re-derives the pairs per chunk and, per tile of rows, scatters them into one reused zeroed dense
    [B, rows, in * W] basis tile: d table = dy^T basis (one baddbmm, base weights included); dx[n, i] =
    sum_s value'_s(x) * (dy table)[n, row_s] (one bmm, then a gather of the S rows). Autograd keeps x, bw,
    coef and, per (n, i), the interval (int32), fraction and sigmoid the forward computed anyway.
    First-order only (no double backward).
    """

    @staticmethod
    def forward(ctx, x, bw, coef, grid_size, spline_order, grid_range):
        bsz, n, n_in = x.shape
        n_out = coef.shape[1]
        low = _autocast_dtype(x)
        lay = _Layout(grid_size, spline_order, grid_range, x.dtype, x.device)
        table = _table(bw, coef, lay)  # [B, out, in * W]
        # [B * in * W, out], row-major: embedding_bag's fast kernel needs contiguous rows (a strided view of the
        # table - which reshape returns for B = 1 - takes a far slower generic path)
        flat = table.view(bsz, n_out, n_in, lay.width).permute(0, 2, 3, 1).contiguous().view(-1, n_out).to(low)
        rows = lay.rows(bsz, n_in, x.device, per_clip=True)
        y = x.new_empty(bsz, n, n_out)
        step = max(1, min(n, _chunk_pairs(x.device) // (bsz * n_in)))
        work = _Work(bsz * step * n_in, lay.slots, x.dtype, x.device, with_derivative=False)
        kept = (torch.empty(x.shape, dtype=torch.int32, device=x.device), torch.empty_like(x), torch.empty_like(x))
        for s, r in _chunks(n, step):
            idx, w, _ = lay.local(x[:, s : s + r], rows, work=work, keep=tuple(t[:, s : s + r] for t in kept))
            w = w.view(bsz * r, -1).to(low)
            out = F.embedding_bag(idx.view(bsz * r, -1), flat, per_sample_weights=w, mode="sum")
            y[:, s : s + r] = out.view(bsz, r, n_out)
        ctx.save_for_backward(x, bw, coef, *kept)
        ctx.grid, ctx.low = (grid_size, spline_order, grid_range), low
        return y

    @staticmethod
    def backward(ctx, gy):
        x, bw, coef, *kept = ctx.saved_tensors
        grid_size, spline_order, grid_range = ctx.grid
        bsz, n, n_in = x.shape
        n_out = coef.shape[1]
        lay = _Layout(grid_size, spline_order, grid_range, x.dtype, x.device)
        cols = n_in * lay.width
        table = _table(bw, coef, lay).to(ctx.low)  # [B, out, in * W]
        rows = lay.rows(bsz, n_in, x.device, per_clip=False)
        gy = gy.contiguous()
        gy_low = gy.to(ctx.low)  # dL/dx's product in the autocast dtype; the table gradient in x's
        need_x = ctx.needs_input_grad[0]
        need_table = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        gx = x.new_empty(x.shape) if need_x else None
        gtable = x.new_zeros(bsz, n_out, cols) if need_table else None
        tile = max(1, min(n, _tile_elements(x.device) // (bsz * cols)))
        step = tile * max(1, min(-(-n // tile), _chunk_pairs(x.device) // (tile * bsz * n_in)))
        work = _Work(bsz * step * n_in, lay.slots, x.dtype, x.device, with_derivative=need_x, long_index=True)
        basis = x.new_zeros(bsz * tile * cols) if need_table else None  # zeroed again after each use
        d = x.new_empty(bsz * tile * cols, dtype=ctx.low) if need_x else None
        picked = x.new_empty(bsz * tile * lay.slots * n_in, dtype=ctx.low) if need_x else None
        if need_x and ctx.low != x.dtype:
            terms = x.new_empty(bsz * tile * lay.slots * n_in)  # the products with dw, in x's dtype
        for c, rc in _chunks(n, step):
            idx, w, dw = lay.local(
                x[:, c : c + rc],
                rows,
                with_derivative=need_x,
                work=work,
                keep=tuple(t[:, c : c + rc] for t in kept),
                reuse=True,
            )
            idx, w = idx.view(bsz, rc, -1), w.view(bsz, rc, -1)
            for s, r in _chunks(rc, tile):
                gys = gy[:, c + s : c + s + r]
                ids = idx[:, s : s + r]
                if need_table:
                    b = basis[: bsz * r * cols].view(bsz, r, cols)
                    b.scatter_(-1, ids, w[:, s : s + r])
                    gtable.baddbmm_(gys.transpose(1, 2), b)
                    b.zero_()
                if need_x:
                    gys = gy_low[:, c + s : c + s + r]
                    dt = torch.bmm(gys, table, out=d[: bsz * r * cols].view(bsz, r, cols))  # dL/d(basis column)
                    p = torch.gather(dt, -1, ids, out=picked[: ids.numel()].view(ids.shape))
                    p = p.view(bsz, r, lay.slots, n_in)
                    if ctx.low == x.dtype:
                        p = p.mul_(dw[:, s : s + r])
                    else:
                        p = torch.mul(p, dw[:, s : s + r], out=terms[: p.numel()].view(p.shape))
                    if bsz == 1:  # contiguous slice of gx: sum straight into it
                        torch.sum(p, dim=2, out=gx[:, c + s : c + s + r])
                    else:
                        gx[:, c + s : c + s + r] = p.sum(dim=2)
        gbw = gcoef = None
        if need_table:
            g = gtable.view(bsz, n_out, n_in, lay.width)
            gbw = g[..., 0] if ctx.needs_input_grad[1] else None
            gcoef = g[..., 2 : 2 + grid_size + spline_order] if ctx.needs_input_grad[2] else None
        return gx, gbw, gcoef, None, None, None


def _autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the layer's two products (forward contraction, backward dL/dx): autocast's (e.g. bfloat16)
    inside an autocast region of x's device, else x's. Inputs, the local basis and the table gradient stay in x's
    dtype, and embedding_bag / bmm accumulate in float32 either way."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _table(bw: Tensor, coef: Tensor, lay: _Layout) -> Tensor:
    """bw [B, out, in], coef [B, out, in, G + k] -> [B, out, in * W]: per input [bw, 0, coef..., 0]."""
    bsz, n_out, n_in, _ = coef.shape
    table = F.pad(coef, (2, 1))
    table[..., 0] = bw
    return table.view(bsz, n_out, n_in * lay.width)


@torch.compiler.disable  # torch.compile (FitConfig.compile) fuses the code around the layer, not through it
def kan_layer_fast(x: Tensor, bw: Tensor, coef: Tensor, grid_size: int, spline_order: int, grid_range) -> Tensor:
    """x: [B, N, in], bw: [B, out, in], coef: [B, out, in, G + k] -> [B, N, out] = SiLU(x) bw^T + spline(x).

    Closed-form local basis, one embedding_bag per chunk, tiled custom backward (`_KanLayer`). Dynamo would
    trace the Function's Python chunk loops and buffer views into a far larger graph than the layer's few
    kernels (a long compile for slower steps), so compilation stops at this call."""
    return _KanLayer.apply(
        x.contiguous(), bw.contiguous(), coef.contiguous(), grid_size, spline_order, tuple(grid_range)
    )


def kan_layer_recursion(x: Tensor, bw: Tensor, coef: Tensor, grid_size: int, spline_order: int, grid_range) -> Tensor:
    """Reference (the paper code's formulation): base branch + dense recursion basis and one bmm."""
    return linear(F.silu(x), bw, None) + spline_contract_recursion(x, coef, grid_size, spline_order, grid_range)


def spline_contract_fast(x: Tensor, coef: Tensor, grid_size: int, spline_order: int, grid_range) -> Tensor:
    """x: [B, N, in], coef: [B, out, in, G + k] -> [B, N, out]: the spline part alone (a zero base weight)."""
    bw = coef.new_zeros(coef.shape[:3])
    return kan_layer_fast(x, bw, coef, grid_size, spline_order, grid_range)


def spline_contract_recursion(x: Tensor, coef: Tensor, grid_size: int, spline_order: int, grid_range) -> Tensor:
    """Reference formulation (the paper code's): dense recursion basis, then one bmm. Same shapes as the fast one."""
    bsz, n, n_in = x.shape
    grid = knots(grid_size, spline_order, grid_range, dtype=x.dtype, device=x.device)
    bases = bspline_basis_recursion(x, grid, spline_order)  # [B, N, in, G + k]
    return torch.bmm(bases.reshape(bsz, n, -1), coef.reshape(bsz, coef.shape[1], -1).transpose(1, 2))


_LAYER = {"fast": kan_layer_fast, "recursion": kan_layer_recursion}


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
            params[f"bw{i}"] = uniform(
                gen, (n_out, n_in), kaiming_uniform_bound(n_in, math.sqrt(5) * c.scale_base), dtype
            )
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
        layer = _LAYER[c.implementation]
        x = positional_encoding(t, buffers["freq"])
        for i in range(len(self.dims)):
            coef = params[f"sw{i}"]
            if c.enable_scale_spline:
                coef = coef * params[f"ss{i}"].unsqueeze(-1)
            x = layer(x, params[f"bw{i}"], coef, c.grid_size, c.spline_order, c.grid_range)
        return x.squeeze(-1)
