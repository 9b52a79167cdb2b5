"""The six INR families as batched functional models `f(params, t)` (see base.py).

from fewsound.inr import build_inr, FAMILIES, coordinates
inr = build_inr("kan", grid_size=5)
params, buffers = inr.init([0, 1, 2])          # three independent networks, every tensor [3, ...]
y = inr(params, coordinates(32768), buffers)   # [3, 32768]
"""

from fewsound.inr.base import INR, ParamSpec, coordinates
from fewsound.inr.registry import FAMILIES, build_inr, family_config

__all__ = ["FAMILIES", "INR", "ParamSpec", "build_inr", "coordinates", "family_config"]
