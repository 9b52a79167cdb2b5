"""FewSound and HyperSound hypernetworks over the batched functional INRs, and windowed long-audio reconstruction.

from fewsound.hyper import HyperConfig, build_model, save_model, load_model, reconstruct_long
model = build_model(HyperConfig(target="kan", preset="17.5M"))
recon = model(audio)                              # [B, 32768] -> [B, 32768]
params, buffers = model.target_params(audio)      # per-sound target INR weights, every tensor [B, ...]
y = reconstruct_long(model, long_audio)           # any length, window by window with crossfades
"""

from fewsound.hyper.config import PRESETS, HyperConfig
from fewsound.hyper.model import FewSound, HyperSound, build_model, load_model, save_model
from fewsound.hyper.windows import crossfade_weights, reconstruct_long, window_starts

__all__ = [
    "PRESETS",
    "FewSound",
    "HyperConfig",
    "HyperSound",
    "build_model",
    "crossfade_weights",
    "load_model",
    "reconstruct_long",
    "save_model",
    "window_starts",
]
