"""WIRE: an MLP with the complex Gabor wavelet activation (Saragadam et al., 2023).

    psi(z) = exp(j omega z - |s0 z|^2)
    x_1 = psi_{omega_0}(W_0 t + b_0)            (first layer real)
    x_{l+1} = psi_{omega_i}(W_l x_l + b_l)       (complex weights and biases)
    y = Re(W_n x_n + b_n)                        (complex output layer, real part)

Widths [90, 90, 90, 90, 70] -> 31,191 parameters when a complex weight counts as one (the paper's count);
62,202 real floats (`num_real_params`). Complex parameters are stored as complex tensors (complex64 for
float32), which torch's optimizers handle elementwise like real ones.

Init as torch's nn.Linear: U(+-1/sqrt(n_in)) for weights and biases; for complex tensors the real and
imaginary parts are drawn independently from that range.

Evaluation in real arithmetic. Activations are carried as real planes [Re x, Im x] ([B, N, 2 * width]); a
complex layer is ONE real bmm with the block matrix [[Wr, -Wi], [Wi, Wr]] (`_complex_linear`), and
psi(a + jb) = exp(-omega b - s0^2 (a^2 + b^2)) (cos(omega a) + j sin(omega a)) is a custom autograd Function
with a closed-form backward (`_GaborPlanes`). `forward_complex` is the same network in torch complex ops (the
reference the tests compare against, in float64). Two things make this form fast on the CPU: denormals (Gabor
envelopes far from their centre underflow through the denormal range, where x86 arithmetic is several times
slower: fit() flushes denormals on the CPU), and no complex elementwise ops nor autograd through exp/cos/sin/cat
(the real planes with a hand-written backward). What remains is inherent: a complex width x width layer is four
real matmuls, and each unit needs exp, cos and sin.

Defaults (the paper gives none; WIRE's image defaults omega = 20, s0 = 10 do not learn audio here): see
DEFAULTS_NOTE below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fewsound.inr.base import INR, ParamSpec, check_positive, check_widths, linear, mlp_dims, uniform

DEFAULTS_NOTE = """
omega_0 = 2000, omega_i = 1, s0 = 0.5 (learning rate 1e-3, fewsound.fit.DEFAULT_LR).
- The hidden layers decide whether WIRE learns at all. For complex z = a + jb, |psi(z)| = exp(-omega b - s0^2 |z|^2),
  whose maximum over b is exp(omega^2 / (4 s0^2)): the gain a unit can have. With nn.Linear's init the hidden
  pre-activations are |z| ~ 0.5-1, so s0 must be ~1 or less or the envelope zeroes them (s0 = 10, WIRE's image
  default, passes only |z| < 0.2), and omega_i must stay below ~2 s0 or the gain explodes (omega_i 10 / s0 1:
  e^25: the loss explodes). With s0 = 10 (WIRE's image default) the net collapses to silence at any lr.
  benchmarks/inr_defaults.py fits these defaults against the image defaults (omega_i 20, s0 10) and other
  (omega_0, omega_i, s0) on a speech clip.
- omega_0: one unit of t is 16,383.5 samples (0.743 s) on a 1.5 s clip, so a first-layer carrier omega_0 W t
  reaches f = omega_0 |W| / (2 pi 0.743) Hz: 2000 gives up to 430 Hz at init (SIREN's first-layer band; training
  grows W and the later Gabor layers multiply phases); the benchmark also fits omega_0 = 500 and 5000.
- At these values the activations at init are finite and O(1) in every layer (mean |x| 0.9-1.0; tested).
The Optuna search (tune/search/) tunes omega_0, omega_i and s0 further.
"""


@dataclass(frozen=True)
class WireConfig:
    family: ClassVar[str] = "wire"
    widths: tuple[int, ...] = (90, 90, 90, 90, 70)
    omega_0: float = 2000.0  # first-layer carrier frequency
    omega_i: float = 1.0  # hidden-layer carrier frequency
    s0: float = 0.5  # Gaussian window scale (all layers)

    def __post_init__(self):
        check_widths(self)
        check_positive(self, "omega_0")
        check_positive(self, "omega_i")
        check_positive(self, "s0", allow_zero=True)


def gabor(z: torch.Tensor, omega: float, s0: float) -> torch.Tensor:
    """exp(j omega z - |s0 z|^2) for real or complex z (same shape, complex): the reference formula.

    The network does not use it (see `_gabor_planes`); the tests check the two agree."""
    return torch.exp(1j * omega * z - (s0 * z.abs()) ** 2)


class _GaborPlanes(torch.autograd.Function):
    """psi(a + jb) = exp(-omega b - s0^2 (a^2 + b^2)) (cos(omega a) + j sin(omega a)) on real planes.

    z: [..., 2h] = [a, b] (complex pre-activations), or [..., h] = a for the real first layer (b = 0) ->
    [..., 2h] = [Re psi, Im psi]. Real arithmetic with a hand-written backward: with o = psi, g = dL/do,
    P = g_r o_r + g_i o_i and Q = g_i o_r - g_r o_i, dL/da = omega Q - 2 s0^2 a P and dL/db = -(omega + 2 s0^2 b) P.
    torch's complex elementwise ops (and autograd through exp/cos/sin/cat) cost several times more on the CPU.
    """

    @staticmethod
    def forward(ctx, z, omega, s0, is_complex):
        h = z.shape[-1] // 2 if is_complex else z.shape[-1]
        a = z[..., :h]
        log_mag = torch.square(a).mul_(-s0 * s0)
        if is_complex:
            bb = z[..., h:]
            log_mag.addcmul_(bb, bb, value=-s0 * s0).add_(bb, alpha=-omega)
        mag = log_mag.exp_()
        phase = torch.mul(a, omega)
        out = z.new_empty(*z.shape[:-1], 2 * h)
        torch.mul(mag, torch.cos(phase), out=out[..., :h])
        torch.mul(mag, phase.sin_(), out=out[..., h:])
        ctx.save_for_backward(z, out)
        ctx.args = (omega, s0, is_complex, h)
        return out

    @staticmethod
    def backward(ctx, g):
        z, out = ctx.saved_tensors
        omega, s0, is_complex, h = ctx.args
        g = g.contiguous()
        gr, gi, o_r, o_i = g[..., :h], g[..., h:], out[..., :h], out[..., h:]
        p = torch.mul(gr, o_r).addcmul_(gi, o_i)
        q = torch.mul(gi, o_r).addcmul_(gr, o_i, value=-1.0)
        gz = z.new_empty(z.shape)
        a = z[..., :h]
        # dL/da = omega Q - 2 s0^2 a P
        torch.mul(a, p, out=gz[..., :h]).mul_(-2 * s0 * s0).add_(q, alpha=omega)
        if is_complex:
            # dL/db = -(omega + 2 s0^2 b) P
            torch.mul(z[..., h:], -2 * s0 * s0, out=gz[..., h:]).add_(-omega).mul_(p)
        return gz, None, None, None


def _gabor_planes(z: torch.Tensor, omega: float, s0: float, is_complex: bool = True) -> torch.Tensor:
    """[..., 2h] = [Re z, Im z] (or [..., h] real z) -> [..., 2h] = [Re psi(z), Im psi(z)]."""
    return _GaborPlanes.apply(z, float(omega), float(s0), is_complex)


def _complex_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, imag: bool = True) -> torch.Tensor:
    """z = W x + b for complex W [B, out, in], b [B, out] and x given as planes [B, N, 2 in] = [Re x, Im x].

    Returns [Re z, Im z] as [B, N, 2 out] (only Re z, [B, N, out], if not `imag`) from ONE real bmm with the block
    matrix [[Wr, -Wi], [Wi, Wr]]: the complex parameters stay complex tensors (autograd hands them complex
    gradients) but no activation is ever complex."""
    wr, wi = w.real, w.imag
    block = torch.cat([wr, -wi], dim=-1)
    bias = None if b is None else b.real
    if imag:
        block = torch.cat([block, torch.cat([wi, wr], dim=-1)], dim=-2)
        bias = None if b is None else torch.cat([b.real, b.imag], dim=-1)
    return linear(x, block, bias)


class Wire(INR):
    name = "wire"
    autocast_safe = False  # Gabor wavelets of large phases: float32 even under autocast (fewsound.inr.base)
    Config = WireConfig

    @property
    def dims(self):
        return mlp_dims(1, self.config.widths)

    def param_specs(self):
        specs = {}
        for i, (n_in, n_out) in enumerate(self.dims):
            specs[f"w{i}"] = ParamSpec((n_out, n_in), complex=i > 0)
            specs[f"b{i}"] = ParamSpec((n_out,), complex=i > 0)
        return specs

    def init_one(self, gen, dtype):
        params = {}
        for i, (n_in, n_out) in enumerate(self.dims):
            bound = n_in**-0.5
            for key, shape in ((f"w{i}", (n_out, n_in)), (f"b{i}", (n_out,))):
                if i == 0:
                    params[key] = uniform(gen, shape, bound, dtype)
                else:
                    params[key] = torch.complex(uniform(gen, shape, bound, dtype), uniform(gen, shape, bound, dtype))
        return params, {}

    def forward(self, params, t, buffers):
        c = self.config
        n = len(self.dims)
        x = _gabor_planes(linear(t.unsqueeze(-1), params["w0"], params["b0"]), c.omega_0, c.s0, is_complex=False)
        for i in range(1, n - 1):
            x = _gabor_planes(_complex_linear(x, params[f"w{i}"], params[f"b{i}"]), c.omega_i, c.s0)
        y = _complex_linear(x, params[f"w{n - 1}"], params[f"b{n - 1}"], imag=False)
        return y.squeeze(-1)

    def forward_complex(self, params, t, buffers):
        """Reference: the same network in complex arithmetic (for the tests)."""
        c = self.config
        n = len(self.dims)
        x = gabor(linear(t.unsqueeze(-1), params["w0"], params["b0"]), c.omega_0, c.s0)
        for i in range(1, n):
            x = linear(x, params[f"w{i}"], params[f"b{i}"])
            if i < n - 1:
                x = gabor(x, c.omega_i, c.s0)
        return x.real.squeeze(-1)
