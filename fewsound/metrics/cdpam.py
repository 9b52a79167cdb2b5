"""CDPAM (Manocha et al. 2021) with the `cdpam` package's own trained weights, loaded once per process and device.

As the paper's code: clips at 22,050 Hz (resampled with kaiser_best otherwise), scaled to the int16 range with
round(x * 32768) like the cdpam authors' load_audio, distance = model(ref, rec) per pair.

Loading. `cdpam.CDPAM.__init__` calls `torch.load(path)` without `weights_only`; since torch 2.6 that means
weights_only=True, and the wheel's checkpoint is a legacy (non-zip) pickle that the weights-only unpickler
rejects outright ("Unsupported operand 73"), so allow-listing globals with torch.serialization.safe_globals cannot
help. We therefore subclass `cdpam.CDPAM` and replace only its __init__: build the package's own `FINnet` with the
hyper-parameters `CDPAM.__init__` uses and load the same file with `weights_only=False`. That is safe here because
the file ships inside the installed `cdpam` wheel, whose Python code we already execute on import - unpickling it
grants nothing more. Nothing in the package is patched, and the setting is not process-wide (unlike
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD). Its __init__ also defaults to 'cuda:0'; we always pass the device.

Speed. One forward costs ~300 GFLOP per 1.5 s signal (16 convolutions of width 15 at up to 1024 channels), so on a
CPU the network, not the model load, dominates. `embed` computes the same numbers as the package's
`base_encoder.forward` with less work: the four layers followed by `x[:, :, ::2]` are evaluated as stride-2
convolutions (only the kept outputs), and the last layer only for the first half of its channels - the "acoustic"
half that the distance uses (the "content" half is discarded). About 25% fewer FLOPs; the test suite checks the
result against the package's unmodified `CDPAM.forward`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cdpam
import numpy as np
import torch
import torch.nn.functional as F
from cdpam.models import FINnet

from fewsound.metrics.common import as_batch, check_pair, resample_paper

CDPAM_SR = 22_050
# The hyper-parameters cdpam.CDPAM.__init__ (cdpam 0.0.6) builds its FINnet with.
_FINNET_ARGS = dict(encoder_layers=16, encoder_filters=64, ndim=[16, 6], classif_dp=0.05, classif_BN=0,
                    classif_act="no", input_size=512)
_LEAKY_SLOPE = 0.1  # base_encoder's F.leaky_relu(x, 0.1)

_models: dict[str, "CDPAMModel"] = {}
_models_lock = threading.Lock()


def _checkpoint_path() -> Path:
    return Path(cdpam.__file__).parent / "CDPAM_trained" / "scratchJNDdefault_best_model.pth"


class CDPAMModel(cdpam.CDPAM):
    """`cdpam.CDPAM` on an explicit device, loaded as explained in the module docstring. `forward` is the package's."""

    def __init__(self, dev: str | torch.device):
        self.device = torch.device(dev)
        model = FINnet(dev=self.device, **_FINNET_ARGS)
        state = torch.load(_checkpoint_path(), map_location="cpu", weights_only=False)["state"]
        model.load_state_dict(state)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """int16-scaled audio `[B, N]` -> L2-normalised acoustic embedding `[B, 512]` (= base_encoder's, normalised)."""
        enc = self.model.base_encoder
        h = x.float().to(self.device).unsqueeze(1)
        last = enc.num_layers - 1
        for i, (conv, bn) in enumerate(zip(enc.encoder, enc.ebatch)):
            w, b = conv.weight, conv.bias
            rm, rv, g, beta = bn.running_mean, bn.running_var, bn.weight, bn.bias
            if i == last:  # only the acoustic half of the last layer's channels is used
                keep = w.shape[0] // 2
                w, b, rm, rv, g, beta = w[:keep], b[:keep], rm[:keep], rv[:keep], g[:keep], beta[:keep]
            stride = 2 if (i + 1) % 4 == 0 else 1  # == conv at stride 1 followed by [:, :, ::2]
            h = F.conv1d(h, w, b, stride=stride, padding=conv.padding)
            h = F.batch_norm(h, rm, rv, g, beta, training=False, eps=bn.eps)
            h = F.leaky_relu(h, _LEAKY_SLOPE)
        return F.normalize(h.mean(dim=2), dim=1)

    @torch.inference_mode()
    def distance(self, ref: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """int16-scaled `[B, N]` pairs -> CDPAM distance `[B]` (on CPU)."""
        return self.model.model_dist(self.embed(ref), self.embed(rec)).float().cpu()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_cdpam(device: str | torch.device | None = None) -> CDPAMModel:
    """The process-wide CDPAM model for `device` (default: CUDA when present), loaded on first use only."""
    dev = torch.device(device or default_device())
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with _models_lock:
        if str(dev) not in _models:
            _models[str(dev)] = CDPAMModel(dev)
        return _models[str(dev)]


def cdpam_inputs(x: np.ndarray, sr: int) -> torch.Tensor:
    """`[B, N]` float audio at `sr` -> what CDPAM sees: 22,050 Hz, round(x * 32768), float32 `[B, M]`."""
    x = resample_paper(x, sr, CDPAM_SR)
    return torch.from_numpy(np.round(x.astype(np.float64) * 32768.0).astype(np.float32))


def cdpam_distance(refs, recs, sr: int, device=None, batch_size: int = 16) -> np.ndarray:
    """CDPAM distance per clip `[B]` (float64 numpy), pairs evaluated `batch_size` at a time on `device`."""
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    check_pair(x, y)
    model = load_cdpam(device)
    xi, yi = cdpam_inputs(x, sr), cdpam_inputs(y, sr)
    out = [model.distance(xi[i : i + batch_size], yi[i : i + batch_size]) for i in range(0, len(xi), batch_size)]
    return torch.cat(out).double().numpy()
