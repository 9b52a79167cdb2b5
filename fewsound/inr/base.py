"""What every INR family shares: coordinates, the batched functional interface, init and config helpers.

An INR here is *not* an `nn.Module` holding weights. It is a description (a frozen config) plus two functions:

    params, buffers = inr.init(seeds)      # every tensor [B, ...]: one independent network per seed
    y = inr(params, t, buffers)            # t: [N] or [B, N] -> y: [B, N]

so the same code runs a single fit (B = 1), a packed fit of B clips (one network per clip, all evaluated by
batched matmuls), and hypernetworks (params = universal weights + predicted delta, one set per sound).

Initialisation is done per seed on the CPU with its own `torch.Generator`, then stacked and moved to the
device: clip b's tensors depend only on `seeds[b]` (a packed init equals B separate inits) and a seed gives the
same network on every device. Init is not a hot path, so the per-seed loop there is deliberate.

Reduced precision: under torch.autocast (a fit's `precision="bf16"`, a hypernetwork trained in bf16) a family whose
`autocast_safe` is False runs its whole forward with autocast off, in float32 (bfloat16/float16 inputs upcast).
SIREN's and FINER's sines see phases of omega_0 * W t, thousands of radians at the first layer, where bfloat16's
8-bit mantissa steps by several radians: the output is noise. WIRE's Gabor wavelets exp(j omega z - |s0 z|^2)
amplify the same rounding. NeRF, RFF and KAN keep autocast (their bounded activations tolerate it;
tests/test_bf16.py checks every family's forward error under bf16 autocast).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import torch

from fewsound.errors import ConfigError

Tensor = torch.Tensor


def coordinates(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Time coordinates t: [n], `-1 + 2*i/(n-1)` (the paper's code), evenly spaced over [-1, 1]."""
    if n < 2:
        raise ConfigError("n", f"need at least 2 samples for coordinates, got {n}")
    i = torch.arange(n, device=device, dtype=torch.float64)
    return (-1.0 + 2.0 * i / (n - 1)).to(dtype)


@dataclass(frozen=True)
class ParamSpec:
    """Shape of one parameter tensor of one network (without the batch axis) and whether it is complex."""

    shape: tuple[int, ...]
    complex: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class INR:
    """Base of the six families. Subclasses set `name`, `Config` and implement the four methods below."""

    name: ClassVar[str]
    Config: ClassVar[type]
    # False: the forward runs in float32 with autocast off even inside torch.autocast (see the module docstring)
    autocast_safe: ClassVar[bool] = True

    def __init__(self, config: Any = None):
        self.config = self.Config() if config is None else config
        assert isinstance(self.config, self.Config), (type(self.config), self.Config)

    # --- to implement -------------------------------------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        """Trainable tensors of one network, in a fixed order (hypernetworks flatten them in this order)."""
        raise NotImplementedError

    def buffer_specs(self) -> dict[str, ParamSpec]:
        """Fixed (untrained) tensors of one network."""
        return {}

    def init_one(self, gen: torch.Generator, dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Params and buffers of ONE network (no batch axis), drawn from `gen` on the CPU."""
        raise NotImplementedError

    def forward(self, params: dict[str, Tensor], t: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        """t: [B, N] (already expanded, real dtype of the params) -> [B, N]."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------
    def init(
        self,
        seeds: int | Iterable[int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One independent network per seed: params (trainable) and buffers (fixed), each tensor [B, ...]."""
        seeds = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
        assert seeds, "init needs at least one seed"
        assert dtype in (torch.float32, torch.float64), f"dtype must be float32 or float64, got {dtype}"
        per_seed = [self.init_one(torch.Generator().manual_seed(s), dtype) for s in seeds]
        params = {k: torch.stack([p[k] for p, _ in per_seed]).to(device) for k in per_seed[0][0]}
        buffers = {k: torch.stack([b[k] for _, b in per_seed]).to(device) for k in per_seed[0][1]}
        for name, spec in self.param_specs().items():
            assert params[name].shape[1:] == spec.shape, (name, params[name].shape, spec.shape)
            assert params[name].is_complex() == spec.complex, name
        for name, spec in self.buffer_specs().items():
            assert buffers[name].shape[1:] == spec.shape, (name, buffers[name].shape, spec.shape)
        return params, buffers

    def __call__(self, params: dict[str, Tensor], t: Tensor, buffers: dict[str, Tensor] | None = None) -> Tensor:
        """y: [B, N] for t: [N] (shared by all B networks) or [B, N] (one coordinate row per network)."""
        if not self.autocast_safe and torch.is_autocast_enabled(t.device.type):
            with torch.autocast(t.device.type, enabled=False):
                return self({k: _full(v) for k, v in params.items()}, _full(t), _full_dict(buffers))
        assert set(params) == set(self.param_specs()), f"params keys {sorted(params)} != {sorted(self.param_specs())}"
        buffers = {} if buffers is None else buffers
        assert set(buffers) >= set(self.buffer_specs()), f"missing buffers {set(self.buffer_specs()) - set(buffers)}"
        b = next(iter(params.values())).shape[0]
        for name, p in params.items():
            assert p.shape[0] == b, f"param {name} has batch {p.shape[0]}, expected {b}"
        real_dtype = next(iter(params.values())).real.dtype
        t = t.to(real_dtype)
        if t.dim() == 1:
            t = t.expand(b, -1)
        assert t.dim() == 2 and t.shape[0] in (1, b), f"t must be [N] or [B={b}, N], got {tuple(t.shape)}"
        t = t.expand(b, -1)
        # Buffers from init([seed]) (B = 1) may be shared by a batch of B networks (e.g. a shared encoding).
        buffers = {k: v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in buffers.items()}
        y = self.forward(params, t, buffers)
        assert y.shape == t.shape, (y.shape, t.shape)
        return y

    def num_params(self) -> int:
        """The paper's count: every trainable scalar, a complex weight counting as one."""
        return sum(s.numel for s in self.param_specs().values())

    def num_real_params(self) -> int:
        """Real floats stored (a complex weight counts as two)."""
        return sum(s.numel * (2 if s.complex else 1) for s in self.param_specs().values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, params={self.num_params():,})"


# --- building blocks shared by the families ----------------------------------------------------------------


def uniform(gen: torch.Generator, shape: Sequence[int], bound: float, dtype: torch.dtype) -> Tensor:
    """U(-bound, bound) drawn from `gen` (float64 draw, then cast, so float32 and float64 inits agree)."""
    return ((torch.rand(tuple(shape), generator=gen, dtype=torch.float64) * 2.0 - 1.0) * bound).to(dtype)


def kaiming_uniform_bound(fan_in: int, a: float) -> float:
    """Bound of `kaiming_uniform_(a=a)` (leaky-ReLU gain): nn.Linear's default is a = sqrt(5) -> 1/sqrt(fan_in)."""
    gain = math.sqrt(2.0 / (1.0 + a * a))
    return gain * math.sqrt(3.0 / fan_in)


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """Batched affine map: x [B, N, in], w [B, out, in], b [B, out] -> [B, N, out] (one bmm for all B)."""
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def positional_encoding(t: Tensor, freq: Tensor) -> Tensor:
    """NeRF encoding: t [B, N], freq [B, L] -> [B, N, 2L] = [sin(freq*t) (L), cos(freq*t) (L)] (no raw t)."""
    angle = t.unsqueeze(-1) * freq.unsqueeze(1)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def nerf_frequencies(length: int, dtype: torch.dtype) -> Tensor:
    """freq_i = 2^i * pi, i < L: [L]."""
    return (2.0 ** torch.arange(length, dtype=torch.float64) * math.pi).to(dtype)


def mlp_dims(n_in: int, widths: Sequence[int]) -> list[tuple[int, int]]:
    """(in, out) of each layer of an MLP with the given hidden widths and one output."""
    dims = [n_in, *widths, 1]
    return list(zip(dims[:-1], dims[1:]))


# --- config validation (each family's Config.__post_init__ calls these) ------------------------------------


def check_widths(cfg: Any, key: str = "widths") -> None:
    v = getattr(cfg, key)
    if (
        not isinstance(v, tuple)
        or not v
        or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in v)
    ):
        raise ConfigError(_where(cfg, key), f"must be a non-empty sequence of positive ints, got {v!r}")


def check_positive(cfg: Any, key: str, *, integer: bool = False, allow_zero: bool = False) -> None:
    v = getattr(cfg, key)
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or (v < 0 if allow_zero else v <= 0):
        kind = "int" if integer else "number"
        raise ConfigError(
            _where(cfg, key), f"must be a {'non-negative' if allow_zero else 'positive'} {kind}, got {v!r}"
        )


def check_choice(cfg: Any, key: str, choices: Sequence[str]) -> None:
    v = getattr(cfg, key)
    if v not in choices:
        raise ConfigError(_where(cfg, key), f"must be one of {list(choices)}, got {v!r}")


def check_bool(cfg: Any, key: str) -> None:
    v = getattr(cfg, key)
    if not isinstance(v, bool):
        raise ConfigError(_where(cfg, key), f"must be true or false, got {v!r}")


def _where(cfg: Any, key: str) -> str:
    family = getattr(type(cfg), "family", type(cfg).__name__)
    return f"{family}.{key}"


def config_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _full(x: Tensor) -> Tensor:
    """x in float32 if it is in a reduced float type (bfloat16, float16), else x itself."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _full_dict(tensors: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if tensors is None else {k: _full(v) for k, v in tensors.items()}
