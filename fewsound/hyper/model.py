"""FewSound and HyperSound: sound -> per-sound weights of a target INR, evaluated by the batched functional INRs.

    FewSound (paper Sec. 3, Fig. 2):   theta'_b = theta + factor * delta_b,
        delta_b = s * H([E(audio_b), G(theta)])            (s: per-block output scale, see HyperConfig)
    HyperSound (the baseline):         theta_b  = s * H(E(audio_b))

One theta'_b per sound in the batch: the flat vector [B, N_target] is cut into the target family's param dict
(every tensor [B, ...], in `param_specs()` order) and the INR runs all B networks at once (DESIGN.md).
The target's buffers (NeRF/KAN frequencies) are shared, not generated (the code's `share_encoding`).

    model = build_model(HyperConfig(target="kan"))
    recon = model(audio)                         # [B, N] -> [B, N]
    params, buffers = model.target_params(audio)
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fewsound.config import from_dict, to_dict
from fewsound.errors import ConfigError
from fewsound.hyper.config import HyperConfig
from fewsound.hyper.encoders import build_encoder
from fewsound.inr import build_inr, coordinates
from fewsound.safe_load import load_weights_only

Tensor = torch.Tensor
log = logging.getLogger(__name__)


class HyperMLP(nn.Module):
    """H: [B, n_in] -> [B, n_out] through Linear + ELU hidden layers (the reference's MLPHyperNetwork).

    Hidden layers: kaiming-uniform (ReLU gain) weights, zero biases (the reference's hypnettorch-style init).
    Output layer: nn.Linear's default weights with a zero bias (what the reference ends up with for KAN).
    """

    def __init__(self, n_in: int, widths: tuple[int, ...], n_out: int):
        super().__init__()
        dims = [n_in, *widths]
        layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
        for layer in layers:
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        self.hidden = nn.ModuleList(layers)
        self.out = nn.Linear(dims[-1], n_out)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: Tensor) -> Tensor:
        for layer in self.hidden:
            z = F.elu(layer(z))
        return self.out(z)


class ReferenceWeightEncoder(nn.Module):
    """The paper code's G: theta [N] as a 1-channel sequence -> [Conv1d(1, 1, k) + ELU] x 2 -> Linear(N - 2(k-1) -> E).

    ~49M parameters for a 31,080-weight target (reference-code-facts 1.5), more than H.
    """

    def __init__(self, n_target: int, out_dim: int, kernel: int = 8101):
        super().__init__()
        n = n_target - 2 * (kernel - 1)
        if n < 1:
            raise ConfigError(
                "hyper.weight_encoder_kernel", f"kernel {kernel} too large for a {n_target}-weight target"
            )
        self.convs = nn.Sequential(nn.Conv1d(1, 1, kernel), nn.ELU(), nn.Conv1d(1, 1, kernel), nn.ELU())
        self.proj = nn.Linear(n, out_dim)

    def forward(self, theta: Tensor) -> Tensor:  # [N] -> [1, E]
        return self.proj(self.convs(theta.view(1, 1, -1)).flatten(1))


class CompactWeightEncoder(nn.Module):
    """Our default G: theta [N] -> [Conv1d(stride 8) + ELU] x 2 (8 channels) -> adaptive mean pool to 64
    positions -> Linear(512 -> E). ~1.7M parameters for E = 3,296, whatever the target size."""

    def __init__(
        self, n_target: int, out_dim: int, channels: int = 8, kernel: int = 32, stride: int = 8, positions: int = 64
    ):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(1, channels, kernel, stride=stride, padding=kernel // 2),
            nn.ELU(),
            nn.Conv1d(channels, channels, kernel, stride=stride, padding=kernel // 2),
            nn.ELU(),
            nn.AdaptiveAvgPool1d(positions),
        )
        self.proj = nn.Linear(channels * positions, out_dim)

    def forward(self, theta: Tensor) -> Tensor:  # [N] -> [1, E]
        return self.proj(self.convs(theta.view(1, 1, -1)).flatten(1))


WEIGHT_ENCODERS = {
    "compact": lambda cfg, n, e: CompactWeightEncoder(n, e),
    "reference": lambda cfg, n, e: ReferenceWeightEncoder(n, e, cfg.weight_encoder_kernel),
}


def _reference_theta(specs: dict, gen: torch.Generator) -> Tensor:
    """The paper code's universal-weight init: a block whose name holds "w" gets kaiming_uniform_ on a (1, n)
    tensor (fan_in = n, leaky-ReLU a = 0: bound sqrt(6 / n)), every other block zeros. Flat [N]."""
    blocks = []
    for name, spec in specs.items():
        if "w" in name:
            bound = math.sqrt(6.0 / spec.numel)
            blocks.append((torch.rand(spec.numel, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
        else:
            blocks.append(torch.zeros(spec.numel, dtype=torch.float64))
    return torch.cat(blocks).float()


class _HyperModel(nn.Module):
    """What FewSound and HyperSound share: the target INR, the encoder, flat <-> param-dict, buffers, counts."""

    # Buffers (registered below) and the subclasses' H: declared so they type as what they are, not as
    # nn.Module.__getattr__'s `Tensor | Module`.
    out_scale: Tensor  # [N_target]
    coords: Tensor  # [clip_length]
    hyper: HyperMLP

    def __init__(self, cfg: HyperConfig):
        super().__init__()
        self.config = cfg
        self.inr = build_inr(cfg.target_config())
        self.specs = self.inr.param_specs()
        if any(s.complex for s in self.specs.values()):
            raise ConfigError("hyper.target", f"{cfg.target} has complex weights; hypernetwork targets must be real")
        self.n_target = self.inr.num_params()
        params0, buffers0 = self.inr.init([cfg.seed])
        # Target buffers are shared by every sound (batch axis 1; the INR expands them).
        self._buffer_names = {}
        for name, value in buffers0.items():
            self.register_buffer(f"target_{name}", value)
            self._buffer_names[name] = f"target_{name}"
        theta0 = torch.cat([params0[k].reshape(-1) for k in self.specs])  # [N], the INR's own init
        if cfg.output_scaling == "block_rms":
            scale = torch.cat([torch.full((s.numel,), _rms(params0[k])) for k, s in self.specs.items()])
        else:
            scale = torch.ones(self.n_target)
        self.register_buffer("out_scale", scale)
        self._theta0 = theta0
        self.encoder = build_encoder(cfg)
        self.embedding_dim = self.encoder.out_dim
        assert cfg.clip_length is not None  # HyperConfig fills it from the preset
        self.register_buffer("coords", coordinates(cfg.clip_length), persistent=False)
        self.epoch = 0
        self.delta_factor = 1.0

    # --- target weights --------------------------------------------------------------------------------------
    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """[B, N_target] -> {name: [B, *shape]} in param_specs order (views, so gradients flow to `flat`)."""
        assert flat.dim() == 2 and flat.shape[1] == self.n_target, (flat.shape, self.n_target)
        out, i = {}, 0
        for name, spec in self.specs.items():
            out[name] = flat[:, i : i + spec.numel].view(flat.shape[0], *spec.shape)
            i += spec.numel
        return out

    def target_buffers(self, b: int) -> dict[str, Tensor]:
        return {
            name: getattr(self, attr).expand(b, *getattr(self, attr).shape[1:])
            for name, attr in self._buffer_names.items()
        }

    def target_flat(self, audio: Tensor) -> Tensor:
        raise NotImplementedError

    def universal(self, n_samples: int | None = None) -> Tensor:
        raise NotImplementedError

    def target_params(self, audio: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """audio [B, N] -> (params, buffers) of B target INRs, every tensor [B, ...]."""
        flat = self.target_flat(audio)
        return self.unflatten(flat), self.target_buffers(flat.shape[0])

    def render(self, params: dict[str, Tensor], buffers: dict[str, Tensor], n: int | None = None) -> Tensor:
        """Evaluate B target INRs on n (default clip_length) coordinates in [-1, 1] -> [B, n]."""
        t = self.coords if n is None or n == self.config.clip_length else coordinates(n, device=self.coords.device)
        return self.inr(params, t, buffers)

    def forward(self, audio: Tensor) -> Tensor:
        """audio [B, N] (N = clip_length) -> reconstruction [B, N]."""
        assert audio.dim() == 2 and audio.shape[1] == self.config.clip_length, (
            f"audio must be [B, {self.config.clip_length}], got {tuple(audio.shape)}"
        )
        params, buffers = self.target_params(audio)
        return self.render(params, buffers)

    def encode(self, audio: Tensor) -> Tensor:
        """E_S: [B, N] -> [B, E]."""
        z = self.encoder(audio)
        assert z.shape == (audio.shape[0], self.embedding_dim), (z.shape, self.embedding_dim)
        return z

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # --- sizes -----------------------------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        def count(m):
            return sum(p.numel() for p in m.parameters() if p.requires_grad) if m is not None else 0

        theta = getattr(self, "theta", None)  # FewSound's universal weights; HyperSound has none
        counts = {
            "encoder": count(self.encoder),
            "weight_encoder": count(getattr(self, "weight_encoder", None)),
            "hypernetwork": count(self.hyper),
            "universal": theta.numel() if isinstance(theta, nn.Parameter) else 0,
        }
        total = sum(p.numel() for p in self.parameters() if p.requires_grad)
        assert total == sum(counts.values()), (total, counts)  # every trainable tensor belongs to one part
        counts["total"] = total
        counts["target_inr"] = self.n_target  # weights of ONE generated INR (not trainable here)
        return counts

    def describe(self) -> str:
        c = self.param_counts()
        parts = ", ".join(f"{k} {v:,}" for k, v in c.items() if k not in ("total", "target_inr"))
        return (
            f"{self.config.kind}[{self.config.preset}] target={self.config.target} ({c['target_inr']:,} weights) "
            f"encoder={self.config.encoder} E={self.embedding_dim:,}: {parts}; total {c['total']:,}"
        )


def _rms(x: Tensor) -> float:
    r = float(x.double().pow(2).mean().sqrt())
    return r if r > 0 else 1.0


class FewSound(_HyperModel):
    """theta' = theta + factor * s * H([E(audio), G(theta)]), one theta' per sound."""

    def __init__(self, cfg: HyperConfig):
        super().__init__(cfg)
        if cfg.theta_init == "inr":
            theta = self._theta0.clone()
        else:
            theta = _reference_theta(self.specs, torch.Generator().manual_seed(cfg.seed))
        self.theta = nn.Parameter(theta)  # universal weights [N_target]
        self.weight_encoder = WEIGHT_ENCODERS[cfg.weight_encoder](cfg, self.n_target, self.embedding_dim)
        assert cfg.hyper_widths is not None  # HyperConfig fills it from the preset
        self.hyper = HyperMLP(2 * self.embedding_dim, cfg.hyper_widths, self.n_target)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Delta warm-up: factor = min(epoch / delta_warmup_epochs, 1), or 1 without warm-up (the paper's formula).
        The reference passes 1-based epochs (factor 0.02 in the first of 50)."""
        super().set_epoch(epoch)
        w = self.config.delta_warmup_epochs
        self.delta_factor = 1.0 if w == 0 else min(max(self.epoch, 0) / w, 1.0)

    def delta(self, audio: Tensor) -> Tensor:
        """s * H([E_S, E_theta]): [B, N] -> [B, N_target] (before the warm-up factor)."""
        e_s = self.encode(audio)
        e_theta = self.weight_encoder(self.theta)  # [1, E]: the same for every sound, computed once
        return self.out_scale * self.hyper(torch.cat([e_s, e_theta.expand(e_s.shape[0], -1)], dim=1))

    def target_flat(self, audio: Tensor) -> Tensor:
        return self.theta + self.delta_factor * self.delta(audio)

    def universal(self, n_samples: int | None = None) -> Tensor:
        """The universal INR alone (delta = 0) on n_samples (default clip_length) coordinates: [1, n]."""
        return self.render(self.unflatten(self.theta.unsqueeze(0)), self.target_buffers(1), n_samples)


class HyperSound(_HyperModel):
    """theta_b = s * H(E(audio_b)): the hypernetwork outputs the weights (no universal theta, no G, no warm-up).

    With output_scaling="block_rms" the output layer's bias starts at theta0 / s, so at init every sound's INR is
    the target family's own init plus an s-scaled, sound-dependent term.
    """

    def __init__(self, cfg: HyperConfig):
        super().__init__(cfg)
        assert cfg.hyper_widths is not None  # HyperConfig fills it from the preset
        self.hyper = HyperMLP(self.embedding_dim, cfg.hyper_widths, self.n_target)
        if cfg.output_scaling == "block_rms":
            with torch.no_grad():
                self.hyper.out.bias.copy_(self._theta0 / self.out_scale)

    def target_flat(self, audio: Tensor) -> Tensor:
        return self.out_scale * self.hyper(self.encode(audio))

    def universal(self, n_samples: int | None = None) -> Tensor:
        raise ConfigError("hyper.kind", "HyperSound has no universal weights (only FewSound does)")


MODELS = {"fewsound": FewSound, "hypersound": HyperSound}


def build_model(cfg: HyperConfig | None = None, *, verbose: bool = True) -> _HyperModel:
    """The model of `cfg`; prints one line with the parameter count of each part (stderr) when verbose."""
    cfg = HyperConfig() if cfg is None else cfg
    # Module inits (encoder, G, H) are a function of the config's seed, without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = MODELS[cfg.kind](cfg)
    log.info(model.describe())
    if verbose:
        print(model.describe(), file=sys.stderr)
    return model


# --- checkpoints --------------------------------------------------------------------------------------------

FORMAT = "fewsound.hyper"


def save_model(path: str | Path, model: _HyperModel, config: HyperConfig | None = None) -> Path:
    """Write {config, state_dict, epoch} to `path` atomically (temp file + rename)."""
    path = Path(path)
    config = model.config if config is None else config
    assert config == model.config, "save_model: config differs from the model's own"
    payload = {
        "format": FORMAT,
        "version": 1,
        "config": to_dict(config),
        "epoch": model.epoch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_model(path: str | Path, map_location: str | torch.device = "cpu", *, verbose: bool = False) -> _HyperModel:
    """The model saved by `save_model`, in eval mode. ConfigError for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "no such model file")
    payload = load_weights_only(
        path, map_location, what="model file", unreadable="not a readable fewsound model checkpoint"
    )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(path, f"not a fewsound model checkpoint (no '{FORMAT}' format tag)")
    cfg = from_dict(HyperConfig, payload["config"])
    model = build_model(cfg, verbose=verbose)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise ConfigError(path, f"weights do not match the saved config: {str(e).splitlines()[0]}") from e
    model.set_epoch(payload.get("epoch", 0))
    return model.to(map_location).eval()
