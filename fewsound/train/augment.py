"""The paper's code's augmentations of a training crop (not in its text): an all-pass biquad of random pole angle
(phase mangling: the waveform changes, its magnitude spectrum does not) and dequantisation noise."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass


SILENCE_PEAK = 1e-6  # a crop quieter than this is left as is instead of being blown up by peak normalisation


@dataclass(frozen=True)
class Augment:
    """The paper's code's training-crop transforms (see the module docstring): `augment(x, rng)` on crops [b, N]."""

    sample_rate: int
    phase_mangle: float = 0.0  # probability per crop
    dequantize_bits: int = 0  # 0: off
    min_hz: float = 20.0
    max_hz: float = 2_000.0
    pole_radius: float = 0.99

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.phase_mangle > 0:
            x = phase_mangle(
                x,
                rng,
                self.sample_rate,
                p=self.phase_mangle,
                min_hz=self.min_hz,
                max_hz=self.max_hz,
                r=self.pole_radius,
            )
        if self.dequantize_bits > 0:
            x = dequantize(x, rng, self.dequantize_bits)
        return x


def allpass_coefficients(freq_hz: float, sample_rate: int, r: float = 0.99) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) of the second-order all-pass with poles r e^{+-i w}, w = 2 pi freq / sr: |H| = 1 at every frequency
    (the numerator is the reversed denominator), the phase turns by 2 pi around `freq_hz`."""
    c = -2.0 * r * math.cos(2.0 * math.pi * freq_hz / sample_rate)
    return np.array([r * r, c, 1.0]), np.array([1.0, c, r * r])


def phase_mangle(
    x: np.ndarray,
    rng: np.random.Generator,
    sample_rate: int,
    *,
    p: float = 0.8,
    min_hz: float = 20.0,
    max_hz: float = 2_000.0,
    r: float = 0.99,
) -> np.ndarray:
    """Each row of x [b, N] goes, with probability p, through an all-pass biquad whose pole angle is drawn
    log-uniformly in [min_hz, max_hz] -> [b, N] float32 (same magnitude spectrum, another phase)."""
    from scipy.signal import lfilter

    out = np.array(x, dtype=np.float32, copy=True)
    for i in range(len(out)):
        if rng.random() < p:
            freq = math.exp(rng.uniform(math.log(min_hz), math.log(max_hz)))
            b, a = allpass_coefficients(freq, sample_rate, r)
            out[i] = lfilter(b, a, out[i].astype(np.float64)).astype(np.float32)
    return out


def dequantize(x: np.ndarray, rng: np.random.Generator, bits: int = 16) -> np.ndarray:
    """x + U(-0.5, 0.5) / 2^bits: the noise of one `bits`-bit quantisation step (x [b, N] -> [b, N] float32)."""
    noise = (rng.random(np.shape(x)) - 0.5) / float(2**bits)
    return (np.asarray(x, dtype=np.float32) + noise).astype(np.float32)
