"""NeRF: positional encoding followed by a ReLU MLP.

    gamma(t) = [sin(2^i pi t) for i < L] ++ [cos(2^i pi t) for i < L]     (raw t is not included)
    y = W_n relu(... relu(W_1 gamma(t) + b_1) ...) + b_n

Table 1: L = 12, hidden widths [90, 90, 90, 90, 70] -> 33,261 parameters (the paper code's default L = 10
gives 32,901). Init: nn.Linear's default, weights and biases U(+-1/sqrt(fan_in)).
The frequencies are a buffer `freq` [B, L], so a hypernetwork can share them rather than generate them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fewsound.inr.base import (
    INR,
    ParamSpec,
    check_positive,
    check_widths,
    linear,
    mlp_dims,
    nerf_frequencies,
    positional_encoding,
    uniform,
)


@dataclass(frozen=True)
class NerfConfig:
    family: ClassVar[str] = "nerf"
    encoding_length: int = 12  # L: number of octaves; 2L encoding features
    widths: tuple[int, ...] = (90, 90, 90, 90, 70)

    def __post_init__(self):
        check_positive(self, "encoding_length", integer=True)
        check_widths(self)


def init_mlp(gen: torch.Generator, dims, dtype) -> dict[str, torch.Tensor]:
    """nn.Linear default init of every layer: w{i} [out, in], b{i} [out], both U(+-1/sqrt(in))."""
    params = {}
    for i, (n_in, n_out) in enumerate(dims):
        bound = n_in**-0.5
        params[f"w{i}"] = uniform(gen, (n_out, n_in), bound, dtype)
        params[f"b{i}"] = uniform(gen, (n_out,), bound, dtype)
    return params


def mlp_specs(dims) -> dict[str, ParamSpec]:
    specs = {}
    for i, (n_in, n_out) in enumerate(dims):
        specs[f"w{i}"] = ParamSpec((n_out, n_in))
        specs[f"b{i}"] = ParamSpec((n_out,))
    return specs


def relu_mlp(params, x: torch.Tensor, n_layers: int) -> torch.Tensor:
    """x [B, N, in] -> [B, N] through ReLU hidden layers and a linear output."""
    for i in range(n_layers):
        x = linear(x, params[f"w{i}"], params[f"b{i}"])
        if i < n_layers - 1:
            x = torch.relu(x)
    return x.squeeze(-1)


class Nerf(INR):
    name = "nerf"
    Config = NerfConfig

    @property
    def dims(self):
        return mlp_dims(2 * self.config.encoding_length, self.config.widths)

    def param_specs(self):
        return mlp_specs(self.dims)

    def buffer_specs(self):
        return {"freq": ParamSpec((self.config.encoding_length,))}

    def init_one(self, gen, dtype):
        return init_mlp(gen, self.dims, dtype), {"freq": nerf_frequencies(self.config.encoding_length, dtype)}

    def forward(self, params, t, buffers):
        return relu_mlp(params, positional_encoding(t, buffers["freq"]), len(self.dims))
