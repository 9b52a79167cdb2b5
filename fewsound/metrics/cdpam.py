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

Speed. The network (16 convolutions of width 15 at up to 1024 channels per signal), not the model load,
dominates. `embed` computes the same numbers as the package's `base_encoder.forward` with less work:
- the four layers followed by `x[:, :, ::2]` are evaluated as stride-2 convolutions (only the kept outputs), and
  the last layer only for the first half of its channels - the "acoustic" half that the distance uses (the
  "content" half is discarded); each batch norm is folded into its convolution;
- on CPU, each convolution after the first runs as an FFT convolution (overlap-save in blocks of 64 or 128
  points: per frequency bin, one complex matrix product over channels), with the stride-2 layers in polyphase
  form (even and odd samples as twice the channels, kernel 8). The weights' spectra are computed once per process
  and kept, several times the weights' size - `CDPAMModel(dev, conv="direct")` avoids that memory.
  benchmarks/metrics_speed.py measures it against oneDNN's direct convolution; on CUDA, cuDNN's direct
  convolution is used. Float32 throughout: the distance differs from the package's only by the order of float
  sums (the tests bound it at 1e-5 relative).
- signals go through the network two at a time on CPU (larger batches are slower per signal: the activations
  leave the cache), and the embeddings of reference clips are kept (LRU, keyed by the audio's bytes), since a
  sweep compares the same reference with many reconstructions (every INR family, every ablation value).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from pathlib import Path

import cdpam
import numpy as np
import torch
import torch.nn.functional as F
from cdpam.models import FINnet

from fewsound.device import set_numerics
from fewsound.metrics.common import as_batch, check_pair, resample_paper

CDPAM_SR = 22_050
# The hyper-parameters cdpam.CDPAM.__init__ (cdpam 0.0.6) builds its FINnet with.
_FINNET_ARGS = dict(
    encoder_layers=16, encoder_filters=64, ndim=[16, 6], classif_dp=0.05, classif_BN=0, classif_act="no", input_size=512
)
_LEAKY_SLOPE = 0.1  # base_encoder's F.leaky_relu(x, 0.1)

_models: dict[str, "CDPAMModel"] = {}
_models_lock = threading.Lock()


def _checkpoint_path() -> Path:
    return Path(cdpam.__file__).parent / "CDPAM_trained" / "scratchJNDdefault_best_model.pth"


class CDPAMModel(cdpam.CDPAM):
    """`cdpam.CDPAM` on an explicit device, loaded as explained in the module docstring. `forward` is the package's.

    conv: "fft" (FFT convolutions; the CPU default) or "direct" (torch's convolution; the CUDA default).
    """

    CHUNK = 2  # signals per pass through the FFT network (larger batches are slower per signal: cache misses)
    REF_CACHE = 4096  # reference embeddings kept (512 floats each)

    def __init__(self, dev: str | torch.device, conv: str | None = None):
        self.device = torch.device(dev)
        model = FINnet(dev=self.device, **_FINNET_ARGS)
        state = torch.load(_checkpoint_path(), map_location="cpu", weights_only=False)["state"]
        model.load_state_dict(state)
        self.model = model.to(self.device).eval()
        self.conv = conv or ("direct" if self.device.type == "cuda" else "fft")
        if self.conv not in ("fft", "direct"):
            raise ValueError(f"conv must be 'fft' or 'direct', not {self.conv!r}")
        self._layers: list[tuple[torch.Tensor, torch.Tensor, int, int]] | None = None
        self._plan: list[_Layer] | None = None
        self._refs: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """int16-scaled audio `[B, N]` -> L2-normalised acoustic embedding `[B, 512]` (= base_encoder's, normalised)."""
        x = x.float().to(self.device)
        return self._embed_direct(x) if self.conv == "direct" else self._embed_fft(x)

    def _embed_direct(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)
        for w, b, stride, padding in self._folded():
            h = F.leaky_relu(F.conv1d(h, w, b, stride=stride, padding=padding), _LEAKY_SLOPE)
        return F.normalize(h.mean(dim=2), dim=1)

    def _embed_fft(self, x: torch.Tensor) -> torch.Tensor:
        if self._plan is None:
            plan = [_Layer(*layer) for layer in self._folded()]
            with self._lock:
                self._plan = self._plan or plan
        out = []
        for i in range(0, len(x), self.CHUNK):
            h = x[i : i + self.CHUNK].unsqueeze(0)  # [C=1, B, N]: channels first between layers (see _Layer)
            for layer in self._plan:
                h = F.leaky_relu_(layer(h), _LEAKY_SLOPE)
            out.append(F.normalize(h.mean(dim=2).T, dim=1))
        return torch.cat(out)

    def _folded(self) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
        """The encoder's layers as (weight, bias, stride, padding), each batch norm folded into its convolution
        (eval mode: an affine map per channel), the last layer cut to its acoustic half, and each layer followed
        by `[:, :, ::2]` as a stride-2 convolution. Made once per model."""
        with self._lock:
            if self._layers is None:
                enc, layers = self.model.base_encoder, []
                with torch.no_grad():
                    for i, (conv, bn) in enumerate(zip(enc.encoder, enc.ebatch)):
                        keep = conv.weight.shape[0] // (2 if i == enc.num_layers - 1 else 1)
                        scale = bn.weight[:keep] / torch.sqrt(bn.running_var[:keep] + bn.eps)
                        w = (conv.weight[:keep] * scale[:, None, None]).float()
                        b = ((conv.bias[:keep] - bn.running_mean[:keep]) * scale + bn.bias[:keep]).float()
                        layers.append((w, b, 2 if (i + 1) % 4 == 0 else 1, conv.padding[0]))
                self._layers = layers
            return self._layers

    def forget_refs(self) -> None:
        """Drop the kept reference embeddings (benchmarks time the uncached cost)."""
        with self._lock:
            self._refs.clear()

    @torch.inference_mode()
    def distance(self, ref: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """int16-scaled `[B, N]` pairs -> CDPAM distance `[B]` (on CPU).

        Reference embeddings are kept (LRU of REF_CACHE clips) and reused; the missing ones go through the
        network in one batch with the reconstructions (one weight spectrum per layer for all of them).
        """
        keys = [_audio_key(row) for row in ref]
        with self._lock:
            kept = {k: self._refs[k] for k in keys if k in self._refs}
        missing = list(dict.fromkeys(k for k in keys if k not in kept))
        first = {k: keys.index(k) for k in missing}
        emb = self.embed(torch.cat([ref[[first[k] for k in missing]], rec]) if missing else rec)
        kept.update(zip(missing, emb[: len(missing)]))
        with self._lock:
            for k in keys:
                self._refs[k] = kept[k]
                self._refs.move_to_end(k)
            while len(self._refs) > self.REF_CACHE:
                self._refs.popitem(last=False)
        refs = torch.stack([kept[k] for k in keys])
        return self.model.model_dist(refs, emb[len(missing) :]).float().cpu()


def _audio_key(x: torch.Tensor) -> bytes:
    a = x.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.blake2b(a.tobytes(), digest_size=16).digest() + a.shape[0].to_bytes(8, "little")


class _Layer:
    """One encoder layer (convolution + folded batch norm) as an FFT convolution; see the module docstring."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, stride: int, padding: int):
        self.stride, self.padding, self.bias = stride, padding, b.view(-1, 1, 1)
        self.w, self.spectrum = w, None
        if w.shape[1] == 1:  # the first layer (one input channel): a direct convolution is cheap
            return
        if stride == 2:  # y[t] = sum_j w[2j] x_even[t+j] + sum_j w[2j+1] x_odd[t+j]
            w = torch.cat([w[:, :, 0::2], F.pad(w[:, :, 1::2], (0, w.shape[2] % 2))], 1)
        self.k = w.shape[2]
        self.nfft = 128 if w.shape[1] <= 256 else 64  # overlap-save blocks of nfft - k + 1 outputs
        # conj(rfft(w, nfft)) as [freq, C_out, C_in] (a cross-correlation is a product with the conjugate
        # spectrum), by one DFT matmul: 2-3x faster than rfft + permute for these short, wide kernels
        c_out, c_in, k = w.shape
        angle = (
            2
            * math.pi
            * torch.outer(torch.arange(self.nfft // 2 + 1, dtype=torch.float64), torch.arange(k, dtype=torch.float64))
            / self.nfft
        )
        taps = w.reshape(c_out * c_in, k).T
        re, im = torch.cos(angle).float() @ taps, torch.sin(angle).float() @ taps
        self.spectrum = torch.complex(re, im).view(-1, c_out, c_in)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """`[C_in, B, N]` -> `[C_out, B, N or N/2]` (channels first: the layout the FFT products give back)."""
        if self.spectrum is None:
            y = F.conv1d(h.transpose(0, 1), self.w, self.bias.view(-1), stride=self.stride, padding=self.padding)
            return y.transpose(0, 1).contiguous()
        n, p = h.shape[2], self.padding
        out = n if self.stride == 1 else (n - 1) // 2 + 1
        blocks = -(-out // (self.nfft - self.k + 1))
        need = blocks * (self.nfft - self.k + 1) + self.k - 1  # input samples of the overlap-save blocks
        if self.stride == 1:
            x = F.pad(h, (p, need - n - p))  # the extra zeros on the right only feed outputs past `out`
        else:
            x = F.pad(h, (p, 2 * need - n - p))
            x = torch.cat([x[:, :, 0::2], x[:, :, 1::2]])  # polyphase: even then odd samples, as channels
        return _valid_correlation(x, self.spectrum, self.nfft, self.k, out).add_(self.bias)


def _valid_correlation(x: torch.Tensor, spectrum: torch.Tensor, nfft: int, k: int, out: int) -> torch.Tensor:
    """`[C_in, B, blocks * (nfft - k + 1) + k - 1]` -> `[C_out, B, out]`: sum_c sum_j w[o, c, j] x[c, b, t + j] by
    overlap-save, x already padded to whole blocks."""
    c_in, b, _ = x.shape
    step = nfft - k + 1  # valid outputs per block
    blocks = -(-out // step)
    X = torch.fft.rfft(x.unfold(2, nfft, step), dim=-1)  # [C_in, B, blocks, freq]
    freq = X.shape[-1]
    Y = torch.bmm(spectrum, X.permute(3, 0, 1, 2).reshape(freq, c_in, b * blocks))  # [freq, C_out, B*blocks]
    y = torch.fft.irfft(Y.permute(1, 2, 0), n=nfft, dim=-1)[..., :step]  # [C_out, B*blocks, step]
    return y.reshape(-1, b, blocks * step)[..., :out]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_cdpam(device: str | torch.device | None = None) -> CDPAMModel:
    """The process-wide CDPAM model for `device` (default: CUDA when present), loaded on first use only. Sets
    fewsound's numerics (its convolutions without TF32: fewsound.device.set_numerics), whoever called it."""
    set_numerics()
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


def cdpam_distance(refs, recs, sr: int, device=None, batch_size: int = 32) -> np.ndarray:
    """CDPAM distance per clip `[B]` (float64 numpy), pairs evaluated `batch_size` at a time on `device`."""
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    check_pair(x, y)
    model = load_cdpam(device)
    xi, yi = cdpam_inputs(x, sr), cdpam_inputs(y, sr)
    out = [model.distance(xi[i : i + batch_size], yi[i : i + batch_size]) for i in range(0, len(xi), batch_size)]
    return torch.cat(out).double().numpy()
