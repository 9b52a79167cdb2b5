"""SIREN: an MLP with sine activations (Sitzmann et al., 2020), in the paper code's form.

    x_0 = t;   x_{l+1} = sin(omega_l * (W_l x_l) + b_l)   (omega multiplies the layer input: the bias is unscaled)
    y = W_n (omega_n * x_n) + b_n                          (omega is applied before the output layer too)

omega_0 = 2000 for the first layer and omega_i = 30 for every later one (the paper's siren.yaml). Widths
[90, 90, 90, 90, 70] -> 31,191 parameters (omegas are not trained).

Init: first-layer weights U(+-1/n_in); later weights U(+-sqrt(6/n_in) / d); biases nn.Linear's U(+-1/sqrt(n_in)).
`hidden_init` picks d:
- "siren" (default): d = the layer's own omega (omega_i), the published SIREN init, which keeps the
  pre-activations omega_i * W x of unit scale.
- "paper_code": d = omega_0 = 2000 for every later layer - the paper code's `siren_gradient_fix`, which its text
  does not describe. Its hidden pre-activations start omega_0 / omega_i (~67x) smaller than SIREN's, so the
  hidden sines start almost linear.
We default to the published init because the paper describes SIREN, not the code's variant, and it fits
better on speech (benchmarks/inr_defaults.py measures both). The option reproduces the code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fewsound.inr.base import INR, check_choice, check_positive, check_widths, linear, mlp_dims, uniform
from fewsound.inr.nerf import mlp_specs


@dataclass(frozen=True)
class SirenConfig:
    family: ClassVar[str] = "siren"
    widths: tuple[int, ...] = (90, 90, 90, 90, 70)
    omega_0: float = 2000.0
    omega_i: float = 30.0
    hidden_init: str = "siren"  # "siren" (divide by omega_i) | "paper_code" (divide by omega_0)

    def __post_init__(self):
        check_widths(self)
        check_positive(self, "omega_0")
        check_positive(self, "omega_i")
        check_choice(self, "hidden_init", ("siren", "paper_code"))


class Siren(INR):
    name = "siren"
    autocast_safe = False  # sines of large phases: float32 even under autocast (fewsound.inr.base)
    Config = SirenConfig

    @property
    def dims(self):
        return mlp_dims(1, self.config.widths)

    def omegas(self) -> list[float]:
        return [self.config.omega_0] + [self.config.omega_i] * (len(self.dims) - 1)

    def param_specs(self):
        return mlp_specs(self.dims)

    def init_one(self, gen, dtype):
        c = self.config
        params = {}
        for i, (n_in, n_out) in enumerate(self.dims):
            if i == 0:
                bound = 1.0 / n_in
            else:
                bound = math.sqrt(6.0 / n_in) / (c.omega_i if c.hidden_init == "siren" else c.omega_0)
            params[f"w{i}"] = uniform(gen, (n_out, n_in), bound, dtype)
            params[f"b{i}"] = uniform(gen, (n_out,), n_in**-0.5, dtype)
        return params, {}

    def forward(self, params, t, buffers):
        x = t.unsqueeze(-1)
        n = len(self.dims)
        for i, omega in enumerate(self.omegas()):
            x = linear(omega * x, params[f"w{i}"], params[f"b{i}"])
            if i < n - 1:
                x = torch.sin(x)
        return x.squeeze(-1)
