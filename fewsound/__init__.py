"""fewsound: audio implicit neural representations (KAN, SIREN, NeRF, RFF, WIRE, FINER) and the
FewSound / HyperSound hypernetworks, from a laptop CPU to a Ray cluster of GPUs.

The library is plain PyTorch: nothing under `fewsound/` imports Ray (the Ray layer is `tune/`; the README
has a tour of the layout).
"""

from fewsound.errors import AudioError, ConfigError, FewsoundError

__version__ = "0.1.0"
__all__ = ["AudioError", "ConfigError", "FewsoundError", "__version__"]
