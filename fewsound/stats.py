"""Statistics a reviewer accepts for "is configuration A better than B on these clips": the mean with a 95% interval
over clips, a paired test on the same clips with a multiple-comparison correction, and a verdict in words.

    iv = mean_interval([2.1, 2.4, 2.3])                    # Interval(mean, low, high, n, method="t")
    cmp = compare(per_clip, baseline="paper config", metrics=COLUMNS)
    print(comparison_markdown(cmp)); print(verdict(cmp, "best (trial 38)"))

- Interval: the 95% interval of the MEAN over clips. "t" (default): Student's t with n - 1 degrees of freedom,
  mean ± t(0.975, n-1) * s / sqrt(n), s the sample std (ddof 1); "bootstrap": the percentile interval of
  `resamples` resampled means drawn with a fixed seed (the same numbers on every run). One clip: no interval.
- Paired test: Wilcoxon's signed-rank test (scipy.stats.wilcoxon, two-sided) of the per-clip differences
  `config - baseline` on the clips both have a finite value for. Zero differences are dropped (Wilcoxon's own
  treatment, zero_method="wilcox") and the number of clips left is reported; every difference zero means no
  difference (p = 1). With fewer than MIN_PAIRS non-zero differences the test cannot reach p < 0.05 at all
  (its smallest two-sided p is 2 / 2^n), so no p-value is given: "too few clips".
- Several configurations tested against one baseline: Holm's step-down correction over the configurations, per
  metric (`holm`); a configuration "beats" the baseline on a metric when its Holm-adjusted p < alpha and its
  mean difference is in the metric's better direction.

Input `per_clip`: {configuration: {clip id: {metric key: value}}}; `metrics`: (column title, metric key,
"higher"|"lower" is better) triples, as fewsound.tables.COLUMNS.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05
MIN_PAIRS = 6  # two-sided signed-rank: the smallest p with n pairs is 2 / 2^n, below 0.05 from n = 6
METHODS = {
    "t": "95% t interval of the mean (Student's t, n-1 df)",
    "bootstrap": "95% bootstrap percentile interval of the mean (10,000 resamples, seed 0)",
}


@dataclasses.dataclass(frozen=True)
class Interval:
    """The mean of `n` values and its interval [low, high] (None with fewer than 2 values)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    method: str

    def text(self, fmt: str = ".3g") -> str:
        """'2.31 [2.05, 2.57]' ('2.31' without an interval)."""
        if self.low is None or self.high is None:
            return f"{self.mean:{fmt}}"
        return f"{self.mean:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}]"


def _finite(xs: Iterable[Any]) -> np.ndarray:
    a = np.asarray([float(x) for x in xs if x is not None], dtype=float)
    return a[np.isfinite(a)]


def mean_interval(
    xs: Iterable[Any], *, method: str = "t", confidence: float = CONFIDENCE, seed: int = 0, resamples: int = 10_000
) -> Interval:
    """The mean of the finite values of `xs` and its `confidence` interval (see the module docstring). A
    ValueError when there is no finite value or `method` is unknown."""
    if method not in METHODS:
        raise ValueError(f"interval method {method!r}: valid {', '.join(METHODS)}")
    a = _finite(xs)
    if a.size == 0:
        raise ValueError("mean_interval: no finite value")
    mean, n = float(a.mean()), int(a.size)
    if n < 2:
        return Interval(mean, None, None, n, method)
    if method == "t":
        from scipy.stats import t

        half = float(t.ppf(0.5 + confidence / 2, n - 1)) * float(a.std(ddof=1)) / math.sqrt(n)
        return Interval(mean, mean - half, mean + half, n, method)
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    lo, hi = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Interval(mean, float(lo), float(hi), n, method)


@dataclasses.dataclass
class PairedTest:
    """A configuration against the baseline on one metric, on the clips both have: the mean difference
    (config - baseline) and its interval, Wilcoxon's statistic and p (None: not tested, see `note`), Holm's
    adjusted p (set by `compare`)."""

    n: int  # clips paired
    n_nonzero: int  # of which with a non-zero difference (what the signed-rank test ranks)
    diff: Interval
    statistic: float | None
    p: float | None
    note: str = ""  # "too few clips", "identical on every clip", ...
    p_holm: float | None = None

    def p_text(self) -> str:
        if self.p is None:
            return self.note
        holm = f", Holm {self.p_holm:.3g}" if self.p_holm is not None else ""
        return f"p = {self.p:.3g}{holm} (n = {self.n})"


def paired_test(a: Sequence[float], b: Sequence[float], *, method: str = "t") -> PairedTest:
    """Wilcoxon signed-rank test (two-sided) of a - b over pairs where both are finite; see the module docstring."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired_test: {x.shape} vs {y.shape} values")
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    n = int(d.size)
    if n == 0:
        return PairedTest(0, 0, Interval(math.nan, None, None, 0, method), None, None, "no clip in common")
    diff = mean_interval(d, method=method)
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        return PairedTest(n, 0, diff, 0.0, 1.0, "identical on every clip")
    if nonzero < MIN_PAIRS:
        why = f"too few clips (n = {n}, {nonzero} differ; a paired test needs {MIN_PAIRS})"
        return PairedTest(n, nonzero, diff, None, None, why)
    from scipy.stats import wilcoxon

    res = wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return PairedTest(n, nonzero, diff, float(res.statistic), float(res.pvalue))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values of the tested (non-None) entries; None stays None."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])  # type: ignore[arg-type, return-value]
    m = len(order)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))  # type: ignore[arg-type]
        out[i] = running
    return out


@dataclasses.dataclass
class Comparison:
    """Configurations on the same clips: intervals[config][title], tests[config][title] (the baseline has none)."""

    baseline: str
    configs: list[str]
    metrics: list[tuple[str, str, str]]  # (title, key, better) of the metrics some configuration has
    clips: list[str]
    intervals: dict[str, dict[str, Interval]]
    tests: dict[str, dict[str, PairedTest]]
    method: str
    alpha: float = ALPHA

    def beats(self, config: str) -> tuple[list[str], list[str]]:
        """(metrics `config` is significantly better on, metrics it is significantly worse on) than the baseline."""
        better: list[str] = []
        worse: list[str] = []
        for title, _, direction in self.metrics:
            t = self.tests.get(config, {}).get(title)
            if t is None or t.p_holm is None or t.p_holm >= self.alpha or not math.isfinite(t.diff.mean):
                continue
            up = t.diff.mean > 0
            (better if up == (direction == "higher") else worse).append(title)
        return better, worse


def compare(
    per_clip: dict[str, dict[str, dict[str, float]]],
    baseline: str,
    metrics: Sequence[tuple[str, str, str]],
    *,
    method: str = "t",
    alpha: float = ALPHA,
) -> Comparison:
    """Every configuration's interval per metric, and each one against `baseline` on the clips both have (a
    Wilcoxon test per metric, Holm-corrected over the configurations). A ValueError names a missing baseline."""
    if baseline not in per_clip:
        raise ValueError(f"compare: no baseline {baseline!r} among {sorted(per_clip)}")
    configs = [baseline] + [c for c in per_clip if c != baseline]
    clips = sorted({clip for rows in per_clip.values() for clip in rows})

    def values(config: str, key: str) -> list[float]:
        rows = per_clip[config]
        return [float(rows[c][key]) if c in rows and rows[c].get(key) is not None else math.nan for c in clips]

    present = [m for m in metrics if any(np.isfinite(values(c, m[1])).any() for c in configs)]
    intervals: dict[str, dict[str, Interval]] = {c: {} for c in configs}
    tests: dict[str, dict[str, PairedTest]] = {c: {} for c in configs[1:]}
    for title, key, _ in present:
        for c in configs:
            if np.isfinite(values(c, key)).any():
                intervals[c][title] = mean_interval(values(c, key), method=method)
        for c in configs[1:]:
            tests[c][title] = paired_test(values(c, key), values(baseline, key), method=method)
        adjusted = holm([tests[c][title].p for c in configs[1:]])
        for c, p in zip(configs[1:], adjusted):
            tests[c][title].p_holm = p
    return Comparison(baseline, configs, list(present), clips, intervals, tests, method, alpha)


def _num(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.2e}" if v != 0 and abs(v) < 1e-2 else f"{v:.4g}"


def _iv(iv: Interval | None) -> str:
    if iv is None:
        return "-"
    return _num(iv.mean) + (f" [{_num(iv.low)}, {_num(iv.high)}]" if iv.low is not None else "")


def comparison_markdown(c: Comparison, title: str = "Held-out clips") -> str:
    """Two Markdown tables: each configuration's mean [95% interval] per metric, and each one against the
    baseline (mean difference [interval], Wilcoxon p, Holm-adjusted p, clips), with what was used said below."""
    cols = [t for t, _, _ in c.metrics]
    out = [f"### {title}: mean [{METHODS[c.method]}] over {len(c.clips)} clips", ""]
    out += ["| configuration | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for cfg in c.configs:
        out.append(f"| {cfg} | " + " | ".join(_iv(c.intervals[cfg].get(t)) for t in cols) + " |")
    out += ["", f"### Against {c.baseline!r} on the same clips: difference (configuration - {c.baseline}) [95%]", ""]
    out += ["| configuration | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for cfg in c.configs[1:]:
        cells = []
        for t in cols:
            test = c.tests[cfg].get(t)
            cells.append("-" if test is None else f"{_iv(test.diff)}; {test.p_text()}")
        out.append(f"| {cfg} | " + " | ".join(cells) + " |")
    better = {t: d for t, _, d in c.metrics}
    out += [
        "",
        f"Test: Wilcoxon signed-rank, two-sided, on the per-clip differences (zero differences dropped; fewer than "
        f"{MIN_PAIRS} non-zero differences: too few clips for a test). Holm's correction over the "
        f"{len(c.configs) - 1} configuration(s) compared, per metric; significant: Holm-adjusted p < {c.alpha}. "
        "Better is " + ", ".join(f"{t} {'higher' if d == 'higher' else 'lower'}" for t, d in better.items()) + ".",
    ]
    return "\n".join(out)


def comparison_rows(c: Comparison) -> list[dict[str, Any]]:
    """One row per (configuration, metric): the interval, and against the baseline the difference and test."""
    rows = []
    for cfg in c.configs:
        for title, key, better in c.metrics:
            iv = c.intervals[cfg].get(title)
            t = c.tests.get(cfg, {}).get(title)
            rows.append(
                {
                    "configuration": cfg,
                    "metric": title,
                    "key": key,
                    "better": better,
                    "n": iv.n if iv else 0,
                    "mean": iv.mean if iv else None,
                    "ci_low": iv.low if iv else None,
                    "ci_high": iv.high if iv else None,
                    "interval": c.method,
                    "baseline": c.baseline,
                    "diff_mean": t.diff.mean if t else None,
                    "diff_low": t.diff.low if t else None,
                    "diff_high": t.diff.high if t else None,
                    "pairs": t.n if t else None,
                    "pairs_nonzero": t.n_nonzero if t else None,
                    "wilcoxon_w": t.statistic if t else None,
                    "p": t.p if t else None,
                    "p_holm": t.p_holm if t else None,
                    "note": t.note if t else "",
                }
            )
    return rows


def verdict(c: Comparison, winner: str, baseline_name: str | None = None) -> str:
    """In words: whether `winner` beats the baseline on the comparison's clips (which metrics, by how much, at
    what p), or that it does not. The first line is the verdict ("VERDICT: X BEATS Y on N held-out clips on
    PESQ, STOI" / "VERDICT: X does NOT beat Y ..."), then a line per metric."""
    base = baseline_name or c.baseline
    n = len(c.clips)
    if winner == c.baseline:
        return f"VERDICT: the winner is {base} itself: nothing to test on the {n} held-out clips."
    better, worse = c.beats(winner)
    tests = c.tests[winner]

    def said(title: str) -> str:
        t = tests[title]
        if t.p is None:
            return f"  {title}: {t.diff.mean:+.3g}, not tested: {t.note}"
        return f"  {title}: {t.diff.mean:+.3g} (95% interval {_num(t.diff.low)} to {_num(t.diff.high)}), {t.p_text()}"

    if better:
        head = f"VERDICT: {winner} BEATS {base} on {n} held-out clips on {', '.join(better)}"
    else:
        head = f"VERDICT: {winner} does NOT beat {base} on {n} held-out clips on any metric"
    if worse:
        head += f"; it is significantly WORSE on {', '.join(worse)}"
    others = [t for t in tests if t not in better and t not in worse]
    lines = [head]
    lines += [f"significantly better ({winner} - {base}):"] + [said(t) for t in better] if better else []
    lines += [f"significantly worse ({winner} - {base}):"] + [said(t) for t in worse] if worse else []
    lines += [f"no significant difference ({winner} - {base}):"] + [said(t) for t in others] if others else []
    k = len(c.configs) - 1
    lines.append(
        f"(Wilcoxon signed-rank, two-sided; Holm-corrected over {k} configuration{'s' * (k != 1)} per metric; "
        f"alpha {c.alpha})"
    )
    return "\n".join(lines)


def interval_figure(c: Comparison, title: str = "Held-out clips") -> Any:
    """A matplotlib Figure: per metric, each configuration's mean with its interval as an error bar."""
    from matplotlib.figure import Figure

    metrics = c.metrics
    cols = min(3, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig = Figure(figsize=(4.2 * cols, 0.45 * len(c.configs) * rows + 1.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    ys = np.arange(len(c.configs))[::-1]
    for ax, (mtitle, _, better) in zip(axes, metrics):
        for y, cfg in zip(ys, c.configs):
            iv = c.intervals[cfg].get(mtitle)
            if iv is None:
                continue
            err = None if iv.low is None else [[iv.mean - iv.low], [iv.high - iv.mean]]  # type: ignore[operator]
            color = "black" if cfg == c.baseline else f"C{c.configs.index(cfg)}"
            ax.errorbar([iv.mean], [y], xerr=err, fmt="o", color=color, capsize=4)
        ax.set_yticks(ys, c.configs, fontsize=8)
        ax.set_title(f"{mtitle} ({better} is better)", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: mean and {METHODS[c.method]}, {len(c.clips)} clips", fontsize=10)
    return fig


def save_figure(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path
