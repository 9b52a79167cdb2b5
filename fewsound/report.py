"""Reports: figures (and, later, the paper-style tables) made from fit and evaluation results.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display needed), so they
work in tests, Ray workers and headless servers alike. The one image every fit of a sweep gets,
`spectrogram_png` (target | prediction | difference), is drawn without matplotlib instead: straight from the dB
arrays through a colour lookup table into an 8-bit palette PNG, so that it costs a sweep milliseconds per fit,
not a figure's layout and anti-aliased rendering.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

# Spectrogram display settings: ~46 ms Hann frames at 22,050 Hz, 75% overlap, 80 dB of range below the target's peak.
SPEC_N_FFT = 1024
SPEC_HOP = 256
SPEC_RANGE_DB = 80.0


def magnitude_db(x: np.ndarray, n_fft: int = SPEC_N_FFT, hop: int = SPEC_HOP) -> np.ndarray:
    """|STFT| in dB (20 log10, floored at 1e-10): x [N] -> [n_fft // 2 + 1, frames]. Centred, zero-padded."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    x = np.pad(x, (n_fft // 2, n_fft // 2))
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]  # [frames, n_fft]
    spec = np.fft.rfft(frames * np.hanning(n_fft + 1)[:-1], axis=-1)  # periodic Hann
    return 20.0 * np.log10(np.maximum(np.abs(spec.T), 1e-10))


def spectrogram_figure(ref: np.ndarray, pred: np.ndarray, sr: int, title: str | None = None):
    """Three panels: target | prediction | difference (the spectrogram of `ref - pred`), all in dB on one scale.

    The difference panel shows where (in time and frequency) the reconstruction error's energy is, on the same
    colour scale as the target, so a good fit shows a panel much darker than the target's.
    Returns a matplotlib Figure.
    """
    from matplotlib.figure import Figure

    ref = np.asarray(ref, dtype=np.float32).reshape(-1)
    pred = np.asarray(pred, dtype=np.float32).reshape(-1)
    assert ref.shape == pred.shape, (ref.shape, pred.shape)
    panels = [
        ("target", magnitude_db(ref)),
        ("prediction", magnitude_db(pred)),
        ("difference", magnitude_db(ref - pred)),
    ]
    vmax = float(panels[0][1].max())
    vmin = vmax - SPEC_RANGE_DB
    extent = (0.0, ref.size / sr, 0.0, sr / 2000.0)  # seconds, kHz

    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (name, db) in zip(axes, panels):
        image = ax.imshow(db, origin="lower", aspect="auto", extent=extent, vmin=vmin, vmax=vmax, cmap="magma")
        ax.set_title(name)
        ax.set_xlabel("time [s]")
    axes[0].set_ylabel("frequency [kHz]")
    fig.colorbar(image, ax=axes, label="dB", shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


# --- the per-fit spectrogram: numpy + Pillow, one palette PNG -------------------------------------------------------

SPEC_LEVELS = 128  # colours of the dB scale (SPEC_RANGE_DB / SPEC_LEVELS dB per step); the rest of the palette
# is the background and the text
SPEC_ROWS = 160  # frequency rows of each panel (max-pooled from SPEC_N_FFT // 2 + 1 bins: narrow harmonics stay)
SPEC_MIN_WIDTH = 240  # panels narrower than this (short clips) repeat each frame
_WHITE, _INK = SPEC_LEVELS, SPEC_LEVELS + 1  # palette indices
_MARGIN = dict(left=44, top=34, right=64, bottom=18, gap=8)


@functools.lru_cache(maxsize=1)
def spectrogram_palette() -> list[int]:
    """The palette of `spectrogram_png`: SPEC_LEVELS colours of matplotlib's magma (dark = quiet), white, black,
    as a flat [r, g, b, r, g, b, ...] list."""
    from matplotlib import colormaps

    rgb = (colormaps["magma"](np.linspace(0.0, 1.0, SPEC_LEVELS))[:, :3] * 255).round().astype(np.uint8)
    return rgb.reshape(-1).tolist() + [255, 255, 255, 0, 0, 0]


def db_levels(db: np.ndarray, vmax: float, rows: int, levels: int = SPEC_LEVELS) -> np.ndarray:
    """dB [F, frames] -> palette levels [rows, frames] (uint8, 0: vmax - SPEC_RANGE_DB or below, levels - 1:
    vmax), low frequencies in the last row (an image's bottom). Bins are max-pooled down to `rows`."""
    edges = np.linspace(0, db.shape[0], rows + 1).round().astype(int)[:-1]
    pooled = np.maximum.reduceat(db, edges, axis=0)
    level = np.clip((pooled - (vmax - SPEC_RANGE_DB)) * ((levels - 1) / SPEC_RANGE_DB), 0.0, levels - 1)
    return level[::-1].round().astype(np.uint8)


def spectrogram_png(ref: np.ndarray, pred: np.ndarray, sr: int, title: str | None = None) -> bytes:
    """The PNG (bytes) of three panels, target | prediction | difference (the spectrogram of `ref - pred`), in dB on
    the target's scale (its peak down SPEC_RANGE_DB), with the panel names, the time and frequency extents and a
    dB colour bar; `title` above. ref, pred: [N] at `sr`.

    8-bit palette pixels, each panel SPEC_ROWS high and one pixel column per STFT frame (frames repeated up to
    SPEC_MIN_WIDTH): the same picture as `spectrogram_figure` at a fraction of its cost and size.
    """
    from PIL import Image, ImageDraw

    ref = np.asarray(ref, dtype=np.float32).reshape(-1)
    pred = np.asarray(pred, dtype=np.float32).reshape(-1)
    assert ref.shape == pred.shape, (ref.shape, pred.shape)
    target = magnitude_db(ref)
    vmax = float(target.max())
    panels = [("target", target), ("prediction", magnitude_db(pred)), ("difference", magnitude_db(ref - pred))]
    levels = [db_levels(db, vmax, SPEC_ROWS) for _, db in panels]
    repeat = -(-SPEC_MIN_WIDTH // levels[0].shape[1])
    levels = [np.repeat(lv, repeat, axis=1) for lv in levels]
    m, w = _MARGIN, levels[0].shape[1]
    width = m["left"] + 3 * w + 2 * m["gap"] + m["right"]
    pixels = np.full((m["top"] + SPEC_ROWS + m["bottom"], width), _WHITE, dtype=np.uint8)
    xs = [m["left"] + i * (w + m["gap"]) for i in range(3)]
    for x, lv in zip(xs, levels):
        pixels[m["top"] : m["top"] + SPEC_ROWS, x : x + w] = lv
    bar = np.linspace(SPEC_LEVELS - 1, 0, SPEC_ROWS).round().astype(np.uint8)[:, None]  # the colour bar
    bar_x = xs[-1] + w + 10
    pixels[m["top"] : m["top"] + SPEC_ROWS, bar_x : bar_x + 10] = bar
    image = Image.fromarray(pixels, mode="P")
    image.putpalette(spectrogram_palette())
    draw = ImageDraw.Draw(image)
    bottom = m["top"] + SPEC_ROWS
    if title:
        draw.text((m["left"], 2), title, fill=_INK)
    draw.text((2, m["top"] - 4), f"{sr / 2000:.0f} kHz", fill=_INK)
    draw.text((2, bottom - 10), "0 kHz", fill=_INK)
    for x, (name, _) in zip(xs, panels):
        draw.text((x, m["top"] - 14), name, fill=_INK)
        draw.text((x, bottom + 3), "0", fill=_INK)
        seconds = f"{ref.size / sr:.2f} s"
        draw.text((x + w - 6 * len(seconds), bottom + 3), seconds, fill=_INK)
    draw.text((bar_x + 13, m["top"] - 4), f"{vmax:.0f} dB", fill=_INK)
    draw.text((bar_x + 13, bottom - 10), f"{vmax - SPEC_RANGE_DB:.0f}", fill=_INK)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_spectrogram_png(
    path: str | Path, ref: np.ndarray, pred: np.ndarray, sr: int, title: str | None = None
) -> Path:
    """Write `spectrogram_figure(ref, pred, sr)` (matplotlib) as a PNG to `path`. Returns the path. A sweep's fits
    use the cheaper `spectrogram_png` instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spectrogram_figure(ref, pred, sr, title=title).savefig(path, dpi=100)
    return path


# --- comparison figures (the report job): several reconstructions of one clip; quality vs parameter count ------


def spectrogram_comparison_figure(ref: np.ndarray, preds: dict[str, np.ndarray], sr: int, title: str | None = None):
    """Fig. 3 of the paper: the ground truth's spectrogram, then one panel per reconstruction (label -> [N]).

    All panels in dB on the ground truth's scale (SPEC_RANGE_DB below its peak), stacked top to bottom.
    Returns a matplotlib Figure.
    """
    from matplotlib.figure import Figure

    ref = np.asarray(ref, dtype=np.float32).reshape(-1)
    panels = [("ground truth", magnitude_db(ref))]
    for label, pred in preds.items():
        pred = np.asarray(pred, dtype=np.float32).reshape(-1)
        assert pred.shape == ref.shape, (label, pred.shape, ref.shape)
        panels.append((label, magnitude_db(pred)))
    vmax = float(panels[0][1].max())
    extent = (0.0, ref.size / sr, 0.0, sr / 2000.0)
    fig = Figure(figsize=(9, 1.9 * len(panels) + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True))
    for ax, (name, db) in zip(axes, panels):
        image = ax.imshow(
            db, origin="lower", aspect="auto", extent=extent, vmin=vmax - SPEC_RANGE_DB, vmax=vmax, cmap="magma"
        )
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("kHz")
    axes[-1].set_xlabel("time [s]")
    fig.colorbar(image, ax=list(axes), label="dB", shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def quality_vs_params_figure(
    series: dict[str, list[tuple[str, int, dict[str, float]]]],
    metrics: tuple[str, ...] = ("PSNR", "PESQ"),
    title: str | None = None,
):
    """Rate-distortion style: one panel per metric, quality against parameter count (log axis).

    series: name (e.g. "grid_size, 1.5 s") -> points (row label, # params, {metric column: mean}); each point is
    annotated with its row label, and a series' points are joined in order of parameter count.
    Returns a matplotlib Figure (panels of metrics no point has are left out).
    """
    from matplotlib.figure import Figure

    metrics = tuple(m for m in metrics if any(m in v for pts in series.values() for _, _, v in pts)) or metrics[:1]
    fig = Figure(figsize=(6.0 * len(metrics), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    for ax, metric in zip(axes, metrics):
        for name, points in series.items():
            pts = sorted((p, v[metric], lab) for lab, p, v in points if p and metric in v)
            if not pts:
                continue
            xs, ys, labels = zip(*pts)
            ax.plot(xs, ys, marker="o", label=name)
            for x, y, lab in pts:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("# parameters")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # none when no row has the metric (e.g. a sweep of MSE only)
        axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
