"""RFF: Gaussian random Fourier features followed by a ReLU MLP (Tancik et al., 2020).

    gamma(t) = [cos(2 pi B t), sin(2 pi B t)],   B ~ N(0, sigma^2), m = 45 frequencies (a fixed buffer)
    y = ReLU MLP(gamma(t)), first layer 2m = 90 -> 90, then widths [90, 90, 90, 90, 70] -> 1

39,201 parameters (B is not counted): the MLP's first layer maps the 90 features to 90 (as in the paper's
code, which builds the MLP with input size = hidden[0]).

Default sigma = 300 (the paper gives none; its code default 1.0 is useless for audio). With t in [-1, 1] over
32,768 samples at 22,050 Hz, one unit of t is 16,383.5 samples = 0.743 s, so a feature cos(2 pi B t) oscillates
at |B| / 0.743 Hz: sigma = 1 gives frequencies around 1.3 Hz, sigma = 300 spreads the 45 frequencies with a
standard deviation of about 400 Hz (speech's fundamentals and first formants; the ReLU MLP adds harmonics).
benchmarks/inr_defaults.py fits sigma = 30 ... 3000 on a speech clip: 100 and 300 fit alike and best, 1000 and
above markedly worse (results in benchmarks/results/inr_defaults.json).
The Optuna search tunes `sigma`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fewsound.inr.base import INR, ParamSpec, check_positive, check_widths, mlp_dims
from fewsound.inr.nerf import init_mlp, mlp_specs, relu_mlp


@dataclass(frozen=True)
class RffConfig:
    family: ClassVar[str] = "rff"
    widths: tuple[int, ...] = (90, 90, 90, 90, 70)
    num_frequencies: int = 45  # m; the encoding has 2m features
    sigma: float = 300.0  # std of B, in cycles per unit of t

    def __post_init__(self):
        check_widths(self)
        check_positive(self, "num_frequencies", integer=True)
        check_positive(self, "sigma")


class Rff(INR):
    name = "rff"
    Config = RffConfig

    @property
    def dims(self):
        return mlp_dims(2 * self.config.num_frequencies, self.config.widths)

    def param_specs(self):
        return mlp_specs(self.dims)

    def buffer_specs(self):
        return {"rff_b": ParamSpec((self.config.num_frequencies,))}

    def init_one(self, gen, dtype):
        # B first, then the MLP, all from this seed's generator.
        b = (torch.randn(self.config.num_frequencies, generator=gen, dtype=torch.float64) * self.config.sigma).to(dtype)
        return init_mlp(gen, self.dims, dtype), {"rff_b": b}

    def forward(self, params, t, buffers):
        angle = (2.0 * math.pi) * t.unsqueeze(-1) * buffers["rff_b"].unsqueeze(1)  # [B, N, m]
        features = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
        return relu_mlp(params, features, len(self.dims))
