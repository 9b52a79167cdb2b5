"""Sound encoders E(audio) -> E_S: audio [B, N] -> embedding [B, E] (E fixed by the config and N).

- SoundStream (default; the paper code's SEANet-style encoder): causal convolutions, ELU, four encoder blocks
  (channels 2C, 4C, 8C, 16C; strides 2, 4, 5, 8), each three residual units (dilations 1, 3, 9) and a strided
  causal conv, then a causal conv to D channels. Output [D, T'] flattened: 32 x 103 = 3,296 on 32,768 samples.
- Spectral: our design in the spirit of the code's VoiceBox-style encoder (which needs a missing PPG checkpoint
  and pyworld): log linear spectrogram + A-weighted loudness -> GLU conv -> causal convs with one frame of
  lookahead -> MLP -> GRU whose last hidden state (size E) is the embedding.
- SNAC-style: Snake activations, depthwise residual units (dilations 1, 3, 9), strides 4/4/8/8, local windowed
  self-attention, then the reference's head: the latent flattened to one channel, Conv1d(1, 1, 4, stride 4) +
  LeakyReLU, Linear to E.
- Whisper: a pretrained encoder from a local checkpoint (nothing can be downloaded here); ConfigError without one.

Every encoder reports its output size as `.out_dim` and is built by `build_encoder(cfg)` from the registry.
Sizes at 32,768 samples, E = 3,296: SoundStream 1,177,408 (GroupNorm; 21,045,792 with the reference's
LayerNorm([C, T]), 1,173,536 without norm - both equal to the reference's counts), spectral 39,451,200 (the
reference's is 41,489,734 with its aux networks), SNAC-style 17,537,381 (reference 21,192,997; ours is not a copy
of SNAC's blocks, so the count differs).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fewsound.errors import ConfigError

Tensor = torch.Tensor


def conv_len(n: int, stride: int) -> int:
    """Output length of a causal conv (left padding (k - 1) * dilation) with this stride: ceil(n / stride)."""
    return -(-n // stride)


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left by dilation * (k - 1): output t sees inputs <= t * stride only."""

    def forward(self, x: Tensor) -> Tensor:
        pad = self.dilation[0] * (self.kernel_size[0] - 1)
        return super().forward(F.pad(x, (pad, 0)))


def _norm(kind: str, channels: int, length: int) -> nn.Module:
    if kind == "layer":  # the reference: LayerNorm over the whole [C, T] map, with a per-element affine
        return nn.LayerNorm([channels, length])
    if kind == "group":  # same statistics as "layer", per-channel affine
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class SoundEncoder(nn.Module):
    """Base of the sound encoders: forward maps audio [B, N] -> [B, out_dim]."""

    out_dim: int  # E, set by each encoder's __init__


class ResidualUnit(nn.Module):
    """x + ELU(N(1x1(ELU(N(causal k7, dilation d (x))))))."""

    def __init__(self, channels: int, dilation: int, norm: str, length: int):
        super().__init__()
        self.body = nn.Sequential(
            CausalConv1d(channels, channels, 7, dilation=dilation),
            _norm(norm, channels, length),
            nn.ELU(),
            nn.Conv1d(channels, channels, 1),
            _norm(norm, channels, length),
            nn.ELU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class SoundStreamEncoder(SoundEncoder):
    """audio [B, N] -> [B, D * ceil(N / 320)] (C = 16, D = 32: 1,173,536 params without norm affines)."""

    STRIDES = (2, 4, 5, 8)

    def __init__(self, clip_length: int, channels: int = 16, dim: int = 32, norm: str = "group"):
        super().__init__()
        n = clip_length
        layers: list[nn.Module] = [CausalConv1d(1, channels, 7), _norm(norm, channels, n), nn.ELU()]
        c = channels
        for stride in self.STRIDES:
            layers += [ResidualUnit(c, d, norm, n) for d in (1, 3, 9)]
            n = conv_len(n, stride)
            layers += [CausalConv1d(c, 2 * c, 2 * stride, stride=stride), _norm(norm, 2 * c, n), nn.ELU()]
            c *= 2
        layers.append(CausalConv1d(c, dim, 3))
        self.net = nn.Sequential(*layers)
        self.frames, self.dim = n, dim
        self.out_dim = n * dim

    @staticmethod
    def frames_for(n: int) -> int:
        """Frames after the four strided causal convs: 103 for 32,768 samples."""
        for s in SoundStreamEncoder.STRIDES:
            n = conv_len(n, s)
        return n

    def forward(self, audio: Tensor) -> Tensor:
        z = self.net(audio.unsqueeze(1))  # [B, D, T']
        assert z.shape[1:] == (self.dim, self.frames), (z.shape, self.dim, self.frames)
        return z.flatten(1)


# --- spectral encoder ---------------------------------------------------------------------------------------


def a_weighting_db(freqs: Tensor) -> Tensor:
    """IEC 61672 A-weighting in dB at `freqs` (Hz); -inf-safe at 0 Hz (clamped)."""
    f2 = freqs.clamp_min(1.0) ** 2
    ra = (12194.0**2 * f2**2) / ((f2 + 20.6**2) * torch.sqrt((f2 + 107.7**2) * (f2 + 737.9**2)) * (f2 + 12194.0**2))
    return 20.0 * torch.log10(ra) + 2.0


class LookaheadConv(nn.Module):
    """Residual conv over frames seeing `lookahead` future frames and k - 1 - lookahead past ones."""

    def __init__(self, channels: int, kernel: int = 3, lookahead: int = 1):
        super().__init__()
        self.pad = (kernel - 1 - lookahead, lookahead)
        self.conv = nn.Conv1d(channels, channels, kernel)
        self.norm = nn.GroupNorm(1, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.elu(self.norm(self.conv(F.pad(x, self.pad))))


class SpectralEncoder(SoundEncoder):
    """audio [B, N] -> [B, E]: |STFT| (Hann 512, hop 256, at the data's own rate) -> log, plus A-weighted loudness
    (one channel) -> Conv1d + GLU -> 5 lookahead convs -> MLP -> GRU; E = the GRU's last hidden state."""

    window: Tensor  # [n_fft] Hann window (buffer)
    a_weight: Tensor  # [n_fft // 2 + 1] A-weighting power gain per bin (buffer)

    def __init__(self, out_dim: int, sample_rate: int, channels: int = 256, n_fft: int = 512, hop: int = 256):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
        self.register_buffer("a_weight", 10 ** (a_weighting_db(freqs) / 10), persistent=False)
        n_in = n_fft // 2 + 2  # bins + loudness
        self.glu = nn.Conv1d(n_in, 2 * channels, 3, padding=1)
        self.convs = nn.Sequential(*[LookaheadConv(channels) for _ in range(5)])
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.ELU(), nn.Linear(2 * channels, 2 * channels))
        self.gru = nn.GRU(2 * channels, out_dim, batch_first=True)
        self.out_dim = out_dim

    def features(self, audio: Tensor) -> Tensor:
        """[B, N] -> [B, bins + 1, frames]: log magnitude and A-weighted log loudness (both ~unit scale)."""
        spec = torch.stft(audio, self.n_fft, self.hop, window=self.window, return_complex=True).abs()
        power = spec.pow(2)
        loud = torch.log10((power * self.a_weight[:, None]).mean(1, keepdim=True) + 1e-8) / 4.0
        return torch.cat([torch.log(spec + 1e-5) / 5.0, loud], dim=1)

    def forward(self, audio: Tensor) -> Tensor:
        x = F.glu(self.glu(self.features(audio)), dim=1)
        x = self.mlp(self.convs(x).transpose(1, 2))  # [B, frames, 2C]
        _, h = self.gru(x)
        return h[-1]


# --- SNAC-style encoder -------------------------------------------------------------------------------------


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha with a learned alpha per channel (SNAC/DAC's periodic activation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.sin(self.alpha * x).pow(2) / (self.alpha + 1e-9)


class SnacResidual(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            Snake(channels),
            nn.Conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation, groups=channels),
            Snake(channels),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class LocalAttention(nn.Module):
    """Pre-norm multi-head self-attention within non-overlapping windows of `window` frames (+ residual)."""

    def __init__(self, channels: int, window: int = 16, heads: int = 4):
        super().__init__()
        self.window = window
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:  # x [B, C, T]
        b, c, t = x.shape
        w = min(self.window, t)
        pad = (-t) % w
        h = F.pad(x, (0, pad)).transpose(1, 2).reshape(b * (t + pad) // w, w, c)
        h = self.norm(h)
        h, _ = self.attn(h, h, h, need_weights=False)
        h = h.reshape(b, t + pad, c)[:, :t].transpose(1, 2)
        return x + h


class SnacEncoder(SoundEncoder):
    """audio [B, N] -> [B, E]: conv(1 -> d) -> 4 x [3 residual units, Snake, strided conv (x2 channels)] ->
    local attention -> flatten to one channel -> Conv1d(1, 1, 4, stride 4) + LeakyReLU -> Linear(-> E)."""

    STRIDES = (4, 4, 8, 8)

    def __init__(self, clip_length: int, out_dim: int, d_model: int = 32, window: int = 16):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(1, d_model, 7, padding=3)]
        c, n = d_model, clip_length
        for stride in self.STRIDES:
            layers += [SnacResidual(c, d) for d in (1, 3, 9)]
            layers += [Snake(c), nn.Conv1d(c, 2 * c, 2 * stride, stride=stride, padding=math.ceil(stride / 2))]
            n = (n + 2 * math.ceil(stride / 2) - 2 * stride) // stride + 1
            c *= 2
        layers.append(LocalAttention(c, window))
        self.net = nn.Sequential(*layers)
        flat = c * n
        self.squeeze = nn.Conv1d(1, 1, 4, stride=4)
        self.proj = nn.Linear((flat - 4) // 4 + 1, out_dim)
        self.out_dim = out_dim

    def forward(self, audio: Tensor) -> Tensor:
        z = self.net(audio.unsqueeze(1)).flatten(1).unsqueeze(1)  # [B, 1, C * T']
        return self.proj(F.leaky_relu(self.squeeze(z)).squeeze(1))


# --- Whisper ------------------------------------------------------------------------------------------------


class WhisperEncoder(SoundEncoder):
    """A pretrained Whisper encoder from a LOCAL checkpoint (a Hugging Face model folder), frozen, + a GRU head.

    The paper fine-tunes tiny.en / large-v2 with LoRA; weights cannot be downloaded here, so this class only runs
    where a checkpoint folder is given and `transformers` is installed. Without either it raises ConfigError at
    construction (never a silent download).
    """

    def __init__(self, checkpoint: str, out_dim: int, sample_rate: int):
        super().__init__()
        if not checkpoint:
            raise ConfigError(
                "hyper.whisper_checkpoint",
                "the Whisper encoder needs a local pretrained checkpoint "
                "(a Hugging Face Whisper model folder); none given and nothing is downloaded",
            )
        path = Path(checkpoint)
        if not path.exists():
            raise ConfigError("hyper.whisper_checkpoint", f"no such checkpoint: {path}")
        try:
            from transformers import WhisperFeatureExtractor, WhisperModel
        except ImportError as e:
            raise ConfigError("hyper.whisper_checkpoint", f"the Whisper encoder needs `transformers` ({e})") from e
        try:
            self.features = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
            self.whisper = WhisperModel.from_pretrained(path, local_files_only=True).encoder
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the user's input
            raise ConfigError("hyper.whisper_checkpoint", f"cannot load a Whisper model from {path}: {e}") from e
        self.whisper.requires_grad_(False)
        self.sample_rate = sample_rate
        self.gru = nn.GRU(self.whisper.config.d_model, out_dim, batch_first=True)
        self.out_dim = out_dim

    def forward(self, audio: Tensor) -> Tensor:
        import torchaudio.functional as AF

        x16 = AF.resample(audio, self.sample_rate, 16_000)
        feats = self.features(list(x16.detach().cpu().numpy()), sampling_rate=16_000, return_tensors="pt")
        h = self.whisper(feats.input_features.to(audio.device)).last_hidden_state  # [B, 1500, d] (30 s padded)
        frames = max(1, math.ceil(x16.shape[-1] / 16_000 * 50))  # 50 encoder frames per second
        _, last = self.gru(h[:, :frames])
        return last[-1]


def build_encoder(cfg) -> SoundEncoder:
    """The sound encoder named by `cfg.encoder`; E = SoundStream's frames * D for every encoder (paper: 3,296)."""
    e_dim = SoundStreamEncoder.frames_for(cfg.clip_length) * cfg.embedding_dim
    return ENCODERS[cfg.encoder](cfg, e_dim)


ENCODERS = {
    "soundstream": lambda cfg, e: SoundStreamEncoder(
        cfg.clip_length, cfg.encoder_channels, cfg.embedding_dim, cfg.encoder_norm
    ),
    "spectral": lambda cfg, e: SpectralEncoder(e, cfg.sample_rate, cfg.spectral_channels),
    "snac": lambda cfg, e: SnacEncoder(cfg.clip_length, e, cfg.snac_d_model),
    "whisper": lambda cfg, e: WhisperEncoder(cfg.whisper_checkpoint, e, cfg.sample_rate),
}
