"""HyperConfig: one frozen dataclass that fully determines a FewSound or HyperSound model.

Fields left at None are filled from the size preset in `__post_init__`, so the stored config is always concrete
(flatten / from_dict round-trip it exactly, and `cfg_hash` names it). Defaults are the paper's; where the paper's
code departs from the paper, or does something costly for no gain, the option is here and the choice is said.

Presets (hypernetwork MLP H hidden widths, ELU):
- "17.5M": the reference's [400, 768, 768, 768, 768, 400]. With input 2 * 3,296 = 6,592 and the 31,080-parameter
  KAN (L = 8) target: 5,024,544 + 401 * 31,080 = 17,487,624 parameters (the paper's "17.5M").
- "41.2M": [832, 1536, 1536, 1536, 1536, 832]: the reference's shape, deep layers x2, end layers widened so that
  H for the same KAN comes out at 41,015,784 (within 0.5% of 41.2M; the paper's code holds no 41.2M network -
  reference-code-facts 1.5 - so the widths are ours).
- "tiny": for tests and smoke runs: 4,096-sample clips, a small encoder, H [64, 64], small targets.
Note that H's count scales with the target size (its last layer has (w_last + 1) * N_target weights): with the
"17.5M" widths it is 17,487,624 for KAN(L8), 17,532,135 for SIREN, 18,362,205 for the default NeRF (L = 12).
Counts of the whole model (`param_counts()`), e.g. FewSound-KAN(L8) "17.5M": encoder 1,177,408 + G 1,693,168 +
H 17,487,624 + theta 31,080; with encoder_norm="layer" and weight_encoder="reference" it is the reference's
87,628,476 (21,045,792 + 49,063,980 + 17,487,624 + 31,080).

Preset-derived fields are filled once, at construction: `dataclasses.replace(cfg, preset="tiny")` keeps the old
preset's clip_length/widths; build a new `HyperConfig(preset="tiny", ...)` instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fewsound.errors import ConfigError

KINDS = ("fewsound", "hypersound")
TARGETS = ("nerf", "kan", "siren")
ENCODER_NAMES = ("soundstream", "spectral", "snac", "whisper")

PRESETS: dict[str, dict[str, Any]] = {
    "17.5M": dict(
        clip_length=32_768,
        hyper_widths=(400, 768, 768, 768, 768, 400),
        encoder_channels=16,
        embedding_dim=32,
        weight_encoder_kernel=8101,
    ),
    "41.2M": dict(
        clip_length=32_768,
        hyper_widths=(832, 1536, 1536, 1536, 1536, 832),
        encoder_channels=16,
        embedding_dim=32,
        weight_encoder_kernel=8101,
    ),
    "tiny": dict(
        clip_length=4096, hyper_widths=(64, 64), encoder_channels=4, embedding_dim=8, weight_encoder_kernel=65
    ),
}

# Target INR per (kind, preset class); `target_overrides` are applied on top.
# FewSound: the paper's Table 1 networks for NeRF (L = 12 -> 33,261) and SIREN (31,191); KAN is the ablation base
# (L = 8, [48, 24, 12], G = 10, k = 2 -> 31,080), the target the "17.5M" H is sized for.
# HyperSound: its own 5 x [90] NeRF (L = 10 -> 34,741) and SIREN (33,031); Table 4's KAN has "19K" parameters:
# we take the ablation's [48, 12, 6] (19,908; Table 8), an inference - the paper does not say which 19K KAN.
TARGET_DEFAULTS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("fewsound", "full"): {"nerf": {}, "siren": {}, "kan": {"encoding_length": 8}},
    ("hypersound", "full"): {
        "nerf": {"encoding_length": 10, "widths": (90, 90, 90, 90, 90)},
        "siren": {"widths": (90, 90, 90, 90, 90)},
        "kan": {"encoding_length": 8, "widths": (48, 12, 6)},
    },
    ("any", "tiny"): {
        "nerf": {"encoding_length": 6, "widths": (32, 32)},
        "siren": {"widths": (32, 32)},
        "kan": {"encoding_length": 4, "widths": (8, 4), "grid_size": 5},
    },
}


@dataclass(frozen=True)
class HyperConfig:
    kind: str = "fewsound"  # "fewsound" (theta + delta) | "hypersound" (H outputs the weights)
    target: str = "nerf"  # the paper's default FewSound target ("NERF-based target network")
    target_overrides: dict = field(default_factory=dict)  # keys of the target family's config
    encoder: str = "soundstream"  # "soundstream" | "spectral" | "snac" | "whisper"
    preset: str = "17.5M"
    clip_length: int | None = None  # samples per window (preset: 32,768)
    sample_rate: int = 22_050
    seed: int = 0  # module init and theta init

    # hypernetwork H
    hyper_widths: tuple | None = None  # hidden widths (preset)
    # "block_rms": H's raw output is multiplied, per target block (w0, b0, sw1, ...), by the RMS of that block in
    # the target INR's own init, so one unit of H output means "one typical weight" in every block (KAN's spline
    # coefficients are ~100x smaller than its base weights; SIREN's hidden weights ~10x smaller than NeRF's).
    # "none": the reference (raw H output; the last layer keeps nn.Linear's init with zero bias).
    output_scaling: str = "block_rms"

    # FewSound only
    # theta init: "inr" = the target family's own init (a working network from step 0); "reference" = the paper
    # code's: blocks whose name holds "w" kaiming_uniform over one (1, n) vector (fan_in = n: tiny), others zero
    # (so a KAN's spline scalers - and its spline branch - start at exactly 0).
    theta_init: str = "inr"
    # G: "compact" (default, ~1.7M params: strided convs over theta + pooling + one linear) or "reference" (two
    # Conv1d(1, 1, 8101) + ELU, then Linear(N - 16,200 -> E): ~49M for a 31K target, more than H itself).
    # E_theta = G(theta) is the same for every sound (theta is shared), so it acts on H only as a learned bias of
    # H's first layer: 49M parameters buy no per-sound capacity. "reference" reproduces the code's count.
    weight_encoder: str = "compact"
    weight_encoder_kernel: int | None = None  # the reference G's conv kernel (preset: 8101)
    # theta' = theta + factor * delta with factor = min(epoch / delta_warmup_epochs, 1) (set_epoch). The paper's
    # formula has no warm-up (0, our default); its code uses 50 with 1-based epochs (factor 0.02 in epoch 1).
    delta_warmup_epochs: int = 0

    # encoders
    encoder_channels: int | None = None  # SoundStream C (preset: 16)
    embedding_dim: int | None = None  # SoundStream D per frame (preset: 32): E = frames * D (3,296 on 32,768)
    # SoundStream normalisation: "group" = GroupNorm(1, C): the reference's statistics (mean/var over all of
    # [C, T]) with a per-channel affine, 1.17M params and any input length; "layer" = the reference's
    # LayerNorm([C, T]) with a per-(channel, time) affine (21.0M params, tied to clip_length); "none".
    encoder_norm: str = "group"
    spectral_channels: int = 256  # spectral encoder conv width
    snac_d_model: int = 32
    whisper_checkpoint: str = ""  # local directory or file of a Whisper model (no downloads here)

    def __post_init__(self):
        def bad(key, problem):
            raise ConfigError(f"hyper.{key}", problem)

        if self.kind not in KINDS:
            bad("kind", f"must be one of {list(KINDS)}, got {self.kind!r}")
        if self.target not in TARGETS:
            bad("target", f"must be one of {list(TARGETS)} (FewSound/HyperSound targets), got {self.target!r}")
        if self.encoder not in ENCODER_NAMES:
            bad("encoder", f"must be one of {list(ENCODER_NAMES)}, got {self.encoder!r}")
        if self.preset not in PRESETS:
            bad("preset", f"must be one of {list(PRESETS)}, got {self.preset!r}")
        if not isinstance(self.target_overrides, dict):
            bad("target_overrides", f"must be a mapping of target config keys, got {self.target_overrides!r}")
        object.__setattr__(
            self,
            "target_overrides",
            {k: tuple(v) if isinstance(v, list) else v for k, v in self.target_overrides.items()},
        )
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if isinstance(self.hyper_widths, list):
            object.__setattr__(self, "hyper_widths", tuple(self.hyper_widths))
        for key in (
            "clip_length",
            "sample_rate",
            "encoder_channels",
            "embedding_dim",
            "weight_encoder_kernel",
            "spectral_channels",
            "snac_d_model",
        ):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(key, f"must be a positive int, got {v!r}")
        if self.clip_length < 1024:
            bad("clip_length", f"must be at least 1,024 samples, got {self.clip_length}")
        if not (
            isinstance(self.hyper_widths, tuple)
            and self.hyper_widths
            and all(isinstance(w, int) and w > 0 for w in self.hyper_widths)
        ):
            bad("hyper_widths", f"must be a non-empty sequence of positive ints, got {self.hyper_widths!r}")
        if not isinstance(self.delta_warmup_epochs, int) or self.delta_warmup_epochs < 0:
            bad("delta_warmup_epochs", f"must be an int >= 0, got {self.delta_warmup_epochs!r}")
        for key, choices in (
            ("output_scaling", ("block_rms", "none")),
            ("theta_init", ("inr", "reference")),
            ("weight_encoder", ("compact", "reference")),
            ("encoder_norm", ("group", "layer", "none")),
        ):
            if getattr(self, key) not in choices:
                bad(key, f"must be one of {list(choices)}, got {getattr(self, key)!r}")

    @property
    def size_class(self) -> str:
        return "tiny" if self.preset == "tiny" else "full"

    def target_config(self):
        """The target family's frozen config: preset/kind defaults, then `target_overrides`."""
        from fewsound.inr import family_config

        key = ("any", "tiny") if self.size_class == "tiny" else (self.kind, "full")
        return family_config(self.target, **{**TARGET_DEFAULTS[key][self.target], **self.target_overrides})

    def replace(self, **changes) -> "HyperConfig":
        return dataclasses.replace(self, **changes)
