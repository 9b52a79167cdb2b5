"""fewsound.report.spectrogram_png, the image every fit of a sweep gets: target | prediction | difference drawn
with numpy + Pillow as one palette PNG, on the target's dB scale (unit: no process started)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from fewsound import report

SR = 22_050


def _panels(png: bytes, n: int) -> tuple[Image.Image, list[np.ndarray]]:
    """The decoded image and its three panels as palette levels [SPEC_ROWS, width]."""
    image = Image.open(io.BytesIO(png))
    frames = n // report.SPEC_HOP + 1
    w = frames * -(-report.SPEC_MIN_WIDTH // frames)
    m = report._MARGIN
    pixels = np.asarray(image)
    rows = slice(m["top"], m["top"] + report.SPEC_ROWS)
    xs = [m["left"] + i * (w + m["gap"]) for i in range(3)]
    return image, [pixels[rows, x : x + w] for x in xs]


def test_three_panels_on_the_targets_scale_as_palette_pixels():
    n = 16_384
    t = np.arange(n) / SR
    ref = (0.8 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)  # a 1 kHz tone
    png = report.spectrogram_png(ref, ref, SR, title="nerf-clip-abc")
    image, (target, pred, diff) = _panels(png, n)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and image.mode == "P"
    assert image.height == report._MARGIN["top"] + report.SPEC_ROWS + report._MARGIN["bottom"]
    assert image.getpalette()[: 3 * report.SPEC_LEVELS] == report.spectrogram_palette()[: 3 * report.SPEC_LEVELS]
    assert (target < report.SPEC_LEVELS).all()  # colour levels only inside the panels: no text drawn over them
    # an exact prediction: the same picture, and a difference panel at the bottom of the scale (silence)
    assert np.array_equal(target, pred) and (diff == 0).all()
    # the tone is the brightest row, at its frequency (low frequencies at the bottom)
    row = report.SPEC_ROWS - 1 - int(np.argmax(target.mean(axis=1)))
    assert abs(row - 1000 / (SR / 2) * report.SPEC_ROWS) <= 2, row
    assert target.max() == report.SPEC_LEVELS - 1  # the target's peak is the top of the scale

    # a silent prediction: a black prediction panel, and the whole target in the difference
    _, (target2, pred2, diff2) = _panels(report.spectrogram_png(ref, np.zeros_like(ref), SR), n)
    assert (pred2 == 0).all() and np.array_equal(diff2, target2)
    # half the amplitude: 6 dB darker on the same scale
    _, (_, half, _) = _panels(report.spectrogram_png(ref, ref / 2, SR), n)
    step = 20 * np.log10(2) * (report.SPEC_LEVELS - 1) / report.SPEC_RANGE_DB
    assert abs(float(target.max()) - float(half.max()) - step) <= 1.0


def test_a_short_clip_is_widened_and_a_long_one_is_not():
    for n in (4_096, 65_536):
        ref = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
        image, panels = _panels(report.spectrogram_png(ref, ref * 0.5, SR), n)
        frames = n // report.SPEC_HOP + 1
        assert panels[0].shape[1] >= report.SPEC_MIN_WIDTH and panels[0].shape[1] % frames == 0
        assert (
            image.width
            == report._MARGIN["left"] + 3 * panels[0].shape[1] + 2 * report._MARGIN["gap"] + report._MARGIN["right"]
        )
