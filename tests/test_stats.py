"""fewsound.stats on synthetic paired data: intervals, the paired test, Holm, the verdict; and the regenerated
tables' 95% interval beside mean ± std."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from fewsound import stats
from fewsound.tables import COLUMNS, build_table, to_csv, to_markdown

METRICS = [("PESQ", "eval/pesq", "higher"), ("LSD", "eval/lsd", "lower")]


def _per_clip(values: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, dict[str, float]]]:
    """{config: (pesq per clip, lsd per clip)} -> fewsound.stats' per_clip input."""
    return {
        name: {f"clip{i:02d}": {"eval/pesq": float(p), "eval/lsd": float(d)} for i, (p, d) in enumerate(zip(*v))}
        for name, v in values.items()
    }


def test_t_interval_matches_students_t_and_bootstrap_is_seeded():
    xs = [2.1, 2.4, 2.3, 1.9, 2.6, 2.2]
    iv = stats.mean_interval(xs)
    lo, hi = sps.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=sps.sem(xs))
    assert (iv.mean, iv.n) == (pytest.approx(np.mean(xs)), 6)
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    b1, b2 = stats.mean_interval(xs, method="bootstrap"), stats.mean_interval(xs, method="bootstrap")
    assert b1 == b2 and b1.low < iv.mean < b1.high and b1.method == "bootstrap"
    one = stats.mean_interval([3.0, math.nan])  # non-finite values are left out; one value: no interval
    assert (one.mean, one.low, one.n, one.text()) == (3.0, None, 1, "3")
    with pytest.raises(ValueError, match="no finite value"):
        stats.mean_interval([math.nan])


def test_two_copies_of_the_same_configuration_are_not_declared_different():
    rng = np.random.default_rng(0)
    pesq, lsd = rng.normal(2.0, 0.3, 24), rng.normal(4.0, 0.5, 24)
    # the same fits under two names, and a refit whose clip-to-clip noise is all there is to it
    noisy = (pesq + rng.normal(0, 0.05, 24), lsd + rng.normal(0, 0.05, 24))
    c = stats.compare(
        _per_clip({"paper config": (pesq, lsd), "copy": (pesq.copy(), lsd.copy()), "noisy copy": noisy}),
        "paper config",
        METRICS,
    )
    for metric in ("PESQ", "LSD"):
        same = c.tests["copy"][metric]
        assert (same.p, same.note, same.n, same.n_nonzero) == (1.0, "identical on every clip", 24, 0)
        assert c.tests["noisy copy"][metric].p_holm >= 0.05
    assert c.beats("copy") == ([], []) and c.beats("noisy copy") == ([], [])
    text = stats.verdict(c, "noisy copy")
    assert text.startswith("VERDICT: noisy copy does NOT beat paper config on 24 held-out clips")


def test_a_clearly_better_configuration_is_declared_better_and_a_worse_one_worse():
    rng = np.random.default_rng(1)
    pesq, lsd = rng.normal(2.0, 0.3, 12), rng.normal(4.0, 0.5, 12)
    better = (pesq + 0.3 + rng.normal(0, 0.05, 12), lsd - 0.4 + rng.normal(0, 0.05, 12))
    worse = (pesq - 0.3 + rng.normal(0, 0.05, 12), lsd)
    c = stats.compare(_per_clip({"paper config": (pesq, lsd), "best": better, "worse": worse}), "paper config", METRICS)
    t = c.tests["best"]["PESQ"]
    assert t.p == pytest.approx(sps.wilcoxon(better[0] - pesq).pvalue) and t.p < 0.001
    assert t.p_holm == pytest.approx(2 * t.p)  # Holm over 2 configurations, both at the smallest p of n = 12
    assert 0.2 < t.diff.mean < 0.4 and t.diff.low > 0
    assert c.beats("best") == (["PESQ", "LSD"], [])  # LSD lower is better: a negative difference wins
    assert c.beats("worse") == ([], ["PESQ"])
    text = stats.verdict(c, "best")
    assert text.splitlines()[0] == "VERDICT: best BEATS paper config on 12 held-out clips on PESQ, LSD"
    assert "  PESQ: +0.2" in text or "  PESQ: +0.3" in text
    assert "  LSD: -0.4" in text or "  LSD: -0.3" in text and "(n = 12)" in text
    md = stats.comparison_markdown(c)
    assert "| best |" in md and "Wilcoxon signed-rank" in md and "Holm" in md
    rows = stats.comparison_rows(c)
    assert len(rows) == 3 * 2 and {r["configuration"] for r in rows} == {"paper config", "best", "worse"}
    fig = stats.interval_figure(c)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2


def test_too_few_clips_gives_no_p_value_and_holm_is_step_down():
    a, b = [2.0, 2.5, 2.2, 2.9, 3.1], [1.0, 1.1, 1.2, 1.3, 1.4]
    t = stats.paired_test(a, b)
    assert t.p is None and t.note.startswith("too few clips (n = 5") and t.diff.mean == pytest.approx(1.34)
    c = stats.compare(_per_clip({"p": (np.array(b), np.array(b)), "x": (np.array(a), np.array(a))}), "p", METRICS)
    assert "too few clips" in stats.verdict(c, "x") and "does NOT beat" in stats.verdict(c, "x")
    assert stats.holm([0.01, None, 0.04, 0.03]) == [pytest.approx(0.03), None, pytest.approx(0.06), pytest.approx(0.06)]
    assert stats.verdict(c, "p").startswith("VERDICT: the winner is p itself")


def test_tables_show_the_95_interval_beside_mean_and_std_where_a_row_has_several_clips():
    rows = [{"label": "KAN", "length": 32_768, "eval/pesq": v, "clip_id": f"c{i}"} for i, v in enumerate([2, 2.5, 3])]
    rows.append({"label": "NERF", "length": 32_768, "eval/pesq": 1.5, "clip_id": "c0"})
    table = build_table(rows, title="t")
    kan, nerf = table.groups[0].rows
    lo, hi = sps.t.interval(0.95, 2, loc=2.5, scale=sps.sem([2, 2.5, 3]))
    assert kan.intervals["PESQ"] == (pytest.approx(lo), pytest.approx(hi)) and nerf.intervals == {}
    md = to_markdown(table)
    assert f"| KAN | - | 3 | **2.50 ± 0.41 [{lo:.2f}, {hi:.2f}]** |" in md and "| NERF | - | 1 | 1.50 ± 0.00 |" in md
    assert "95% t interval of the mean" in md
    csv_rows = to_csv(table).splitlines()
    assert csv_rows[0].endswith("ci_low,ci_high") and csv_rows[2].endswith(",,")  # NERF: one clip, no interval
    assert [c for c, _, _ in COLUMNS][4] == "PESQ"
