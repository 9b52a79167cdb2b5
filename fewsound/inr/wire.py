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

For complex z = a + jb, psi(z) = exp(-omega b - s0^2 |z|^2) * exp(j omega a): it is evaluated in that
real form (magnitude and phase), which keeps autograd on real tensors until the complex matmul.

Defaults (the paper gives none; its code defaults are omega = 1, s0 = 10): see DEFAULTS_NOTE below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fewsound.inr.base import INR, ParamSpec, check_positive, check_widths, linear, mlp_dims, uniform

DEFAULTS_NOTE = """
omega_0 = 2000: one unit of t is 16,383.5 samples (0.743 s), so the first layer's carrier omega_0 * W t
(|W| <= 1) oscillates at up to 2000 / (2 pi * 0.743) = 430 Hz, the same first-layer band as SIREN's omega_0;
later Gabor layers multiply phases and reach higher frequencies.
omega_i = 30 and s0 = 2: a Gaussian window exp(-(s0 z)^2) with s0 = 10 (WIRE's image default) would zero
every hidden unit whose pre-activation has |z| > 0.3, which is most of them at init for 90-wide layers; s0 = 2
keeps the window wide enough for the hidden layers to pass signal.
A short fit on real speech compared these against nearby values; the Optuna search tunes them.
"""


@dataclass(frozen=True)
class WireConfig:
    family: ClassVar[str] = "wire"
    widths: tuple[int, ...] = (90, 90, 90, 90, 70)
    omega_0: float = 2000.0  # first-layer carrier frequency
    omega_i: float = 20.0  # hidden-layer carrier frequency
    s0: float = 10.0  # Gaussian window scale (all layers)

    def __post_init__(self):
        check_widths(self)
        check_positive(self, "omega_0")
        check_positive(self, "omega_i")
        check_positive(self, "s0", allow_zero=True)


def gabor(z: torch.Tensor, omega: float, s0: float) -> torch.Tensor:
    """exp(j omega z - |s0 z|^2) for real or complex z (same shape, complex)."""
    if z.is_complex():
        a, b = z.real, z.imag
        magnitude = torch.exp(-omega * b - (s0 * s0) * (a * a + b * b))
    else:
        a = z
        magnitude = torch.exp(-(s0 * s0) * (a * a))
    phase = omega * a
    return torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))


class Wire(INR):
    name = "wire"
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
        x = gabor(linear(t.unsqueeze(-1), params["w0"], params["b0"]), c.omega_0, c.s0)
        for i in range(1, n):
            x = linear(x, params[f"w{i}"], params[f"b{i}"])
            if i < n - 1:
                x = gabor(x, c.omega_i, c.s0)
        return x.real.squeeze(-1)
