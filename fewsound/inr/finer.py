"""FINER: an MLP with the variable-periodic activation of Liu et al. (2024).

variant "published" (default, the FINER paper and its code):
    z_l = W_l x_l + b_l;   x_{l+1} = sin(omega_l * (|z_l| + 1) * z_l);   y = W_n x_n + b_n
variant "paper_code" (the FewSound code, errata 5: the scaling sits on the layer *input*):
    x_{l+1} = sin(W_l (omega_l * (|x_l| + 1) * x_l) + b_l), applied before the output layer too.

omega_0 is used by the first layer, omega_i by the later ones. As in both codes the factor (|z| + 1) is
treated as a constant in backprop unless `scale_requires_grad`.

Init (both variants): first-layer weights U(+-1/n_in), later weights U(+-sqrt(6/n_in)/omega_i), the first
layer's bias U(-k, k) with k = `first_bias_scale`, the other biases nn.Linear's U(+-1/sqrt(n_in)).
Widths [90, 90, 90, 90, 70] -> 31,191 parameters.

Defaults (the paper gives none; its code defaults omega = k = 1 cannot represent audio): omega_0 = 2000,
omega_i = 30 as SIREN (the FINER layer reduces to SIREN's for |z| << 1), and k = 1. One unit of t is
16,383.5 samples (0.743 s), so omega_0 * W t oscillates at up to 2000/(2 pi * 0.743) = 430 Hz; the (|z|+1)
factor raises a unit's local frequency up to (2|z| + 1) times that, and the first-layer bias spread k sets how
far: k = 1 covers up to 3x (1.3 kHz) at the first layer, and the sine layers compose higher harmonics.
benchmarks/inr_defaults.py fits k = 0.2 ... 5 and omega_0 = 500 on a 1.5 s speech clip: after 100 steps the
smaller k = 0.2 fits markedly better than k = 1 (results in benchmarks/results/inr_defaults.json); the default
stays k = 1 until that holds at the paper's fit length. The Optuna search tunes `omega_0`, `omega_i`,
`first_bias_scale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fewsound.inr.base import INR, check_bool, check_choice, check_positive, check_widths, linear, mlp_dims, uniform
from fewsound.inr.nerf import mlp_specs


@dataclass(frozen=True)
class FinerConfig:
    family: ClassVar[str] = "finer"
    widths: tuple[int, ...] = (90, 90, 90, 90, 70)
    omega_0: float = 2000.0
    omega_i: float = 30.0
    first_bias_scale: float = 1.0  # k: first-layer bias ~ U(-k, k)
    variant: str = "published"  # "published" (scale the pre-activation) | "paper_code" (scale the layer input)
    scale_requires_grad: bool = False

    def __post_init__(self):
        check_widths(self)
        check_positive(self, "omega_0")
        check_positive(self, "omega_i")
        check_positive(self, "first_bias_scale", allow_zero=True)
        check_choice(self, "variant", ("published", "paper_code"))
        check_bool(self, "scale_requires_grad")


class Finer(INR):
    name = "finer"
    autocast_safe = False  # sines of large phases: float32 even under autocast (fewsound.inr.base)
    Config = FinerConfig

    @property
    def dims(self):
        return mlp_dims(1, self.config.widths)

    def param_specs(self):
        return mlp_specs(self.dims)

    def init_one(self, gen, dtype):
        c = self.config
        params = {}
        for i, (n_in, n_out) in enumerate(self.dims):
            bound = 1.0 / n_in if i == 0 else math.sqrt(6.0 / n_in) / c.omega_i
            params[f"w{i}"] = uniform(gen, (n_out, n_in), bound, dtype)
            params[f"b{i}"] = uniform(gen, (n_out,), c.first_bias_scale if i == 0 else n_in**-0.5, dtype)
        return params, {}

    def _finer(self, z: torch.Tensor, omega: float) -> torch.Tensor:
        """omega * (|z| + 1) * z, the scale detached unless configured otherwise."""
        scale = z.abs() + 1.0
        if not self.config.scale_requires_grad:
            scale = scale.detach()
        return omega * scale * z

    def forward(self, params, t, buffers):
        c = self.config
        x = t.unsqueeze(-1)
        n = len(self.dims)
        for i in range(n):
            omega = c.omega_0 if i == 0 else c.omega_i
            if c.variant == "published":
                x = linear(x, params[f"w{i}"], params[f"b{i}"])
                if i < n - 1:
                    x = torch.sin(self._finer(x, omega))
            else:
                x = linear(self._finer(x, omega), params[f"w{i}"], params[f"b{i}"])
                if i < n - 1:
                    x = torch.sin(x)
        return x.squeeze(-1)
