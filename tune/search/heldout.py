"""A search's winner checked on clips no trial used: the best K configurations and every start point refitted on
held-out clips as an ordinary sweep (tune.sweep.run_sweep: packed, resumable, recorded, GPU-fractional) under the
search's parent run, then compared with the paper's configuration clip by clip (fewsound.stats).

    result = validate_search(summary, ctx, HeldOut(top=3, corpus=..., clips=24), address=None, ...)
    print(result.markdown); print(result.verdict)

- Held-out clips (`heldout_clips`): the validation corpus's clips of the search's kind, sorted by id, minus every
  clip the search fitted and every clip cut from the same recording (the id before "@", as the built-in corpus's
  protocols name their crops), then `clips` of them drawn with a seeded generator (the same ones on every run)
  and sorted again. The validation corpus is the search's own unless another is named.
- Configurations: every start point that ran every step (the paper's configuration first: the baseline), then
  the `top` best trials that are not start points, ranked by the search's objective; refitted for `steps` on
  `length`-sample clips with the search's seed. A configuration refitted twice under two names is refitted once.
- The refits are child runs of the search's parent (tagged with the sweep's id, keyed as any fit: a re-run of
  the same command skips the refits that finished). The parent gets the sweep's tables (tables/: mean ± std
  [95% interval] per configuration) and validation/: heldout.md, heldout.csv (every configuration x metric:
  interval, difference with the paper's configuration, Wilcoxon p, Holm-adjusted p), intervals.png, clips.json.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fewsound import stats, storage
from fewsound.errors import ConfigError, DataError
from fewsound.plan import FitTask
from fewsound.search_space import to_fit_config
from fewsound.tables import COLUMNS, rows_to_csv
from fewsound.tracking import MlflowRun
from tune.search.results import PAPER, SearchContext, SearchSummary, start_label
from tune.search.study import START_KEY

SWEEP_NAME = "search_inr-heldout"


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """What the held-out validation refits: `top` best trials besides the start points, on `clips` clips (None:
    every held-out clip) of `corpus` (None: the search's), for `steps` (None: the search's) on `length`-sample
    clips (None: the search's); clips drawn with `seed`."""

    top: int = 3
    corpus: str | None = None
    clips: int | None = None
    steps: int | None = None
    length: int | None = None
    seed: int = 0
    method: str = "t"  # the interval (fewsound.stats.METHODS)


@dataclasses.dataclass
class HeldOutResult:
    corpus: str
    clips: list[str]
    excluded: list[str]  # the searched clips (and their recordings) left out
    configs: list[tuple[str, dict[str, Any]]]  # (label, point) refitted, the baseline first
    winner: str  # label of the search's best
    steps: int
    length: int
    comparison: stats.Comparison | None
    markdown: str
    verdict: str
    note: str  # how the clips were chosen, in words
    failed: int = 0
    artifacts: list[str] = dataclasses.field(default_factory=list)


def recording(clip_id: str) -> str:
    """The recording a clip was cut from: its id before "@" (the built-in protocols' crops), else the id."""
    return clip_id.split("@", 1)[0]


def heldout_clips(corpus: str, kind: str, searched: list[str], n: int | None, seed: int) -> tuple[list[Any], str]:
    """(the held-out clips of `corpus`, how they were chosen in words); see the module docstring. A DataError
    when none is left."""
    from tune.jobs import corpus_clips

    every = sorted(corpus_clips(corpus, None, kind), key=lambda c: c.clip_id)
    used = {recording(c) for c in searched}
    left = [c for c in every if c.clip_id not in searched and recording(c.clip_id) not in used]
    if not left:
        raise DataError(corpus, f"no {kind} clip is left once the {len(searched)} searched clips are taken out")
    order = np.random.default_rng([seed, 2025]).permutation(len(left))
    take = len(left) if n is None else min(n, len(left))
    chosen = sorted((left[i] for i in order[:take]), key=lambda c: c.clip_id)
    how = (
        f"{len(chosen)} of {len(left)} held-out {kind} clips of {storage.name(corpus)} (its {len(every)} {kind} "
        f"clips sorted by id, minus the {len(searched)} searched clips and every clip of their recordings"
        + (f"; {take} drawn with seed {seed}" if take < len(left) else "")
        + ")"
    )
    return chosen, how


def configurations(summary: SearchSummary, rows: list[dict[str, Any]], top: int, families: tuple[str, ...]):
    """[(label, point)]: the start points that ran every step (the paper's first), then the `top` best trials
    that are not start points (by the objective); and the label of the search's best."""
    out = [(start_label(r[START_KEY], families), r) for r in summary.starts]
    ranked = sorted(
        (r for r in rows if r["outcome"] == "finished" and not r[START_KEY]),
        key=lambda r: r["objective"],
        reverse=summary.mode == "max",
    )
    out += [(f"{'best' if i == 0 else f'#{i + 1}'} (trial {r['number']})", r) for i, r in enumerate(ranked[:top])]
    best = summary.best
    winner = next((label for label, r in out if best is not None and r["number"] == best["number"]), "")
    return [(label, dict(r["params"])) for label, r in out], winner


def validation_tasks(
    configs: list[tuple[str, dict[str, Any]]], clips: list[Any], length: int, steps: int, seed: int
) -> tuple[list[FitTask], dict[str, str]]:
    """The refits (configuration x clip), and {label: the label it duplicates} for configurations that are the same
    fit as an earlier one (refitted once, shown under the first name)."""
    tasks, seen, same = [], {}, {}
    for label, point in configs:
        cfg = to_fit_config(point["family"], point, steps, seed)
        h = cfg.key_hash(16)
        if h in seen:
            same[label] = seen[h]
            continue
        seen[h] = label
        tasks += [FitTask(cfg, c.clip_id, c.kind, length, label) for c in clips]
    return tasks, same


def validate_search(
    summary: SearchSummary,
    rows: list[dict[str, Any]],
    ctx: SearchContext,
    h: HeldOut,
    corpus: str,
    *,
    address: str | None = None,
    gpu_fraction: float = 0.25,
    concurrency: int | None = None,
    progress: bool = True,
) -> HeldOutResult:
    """Refit and compare (see the module docstring); `corpus`: the validation corpus, resolved for the length."""
    from tune.sweep import run_sweep

    steps, length = h.steps or ctx.steps, h.length or ctx.length
    configs, winner = configurations(summary, rows, h.top, ctx.families)
    if not configs or not configs[0][0].startswith(start_label(PAPER, ctx.families)):
        raise ConfigError("--validate-top", "the paper's configuration did not run every step: nothing to compare to")
    clips, how = heldout_clips(corpus, ctx.kind, list(ctx.clips), h.clips, h.seed)
    tasks, same = validation_tasks(configs, clips, length, steps, ctx.seed)
    if progress:
        print(
            f"[search_inr] held-out validation: {len(configs)} configurations ({', '.join(n for n, _ in configs)}) "
            f"refitted for {steps} steps on {length:,}-sample clips: {how}"
            + "".join(f"; {a} is the same configuration as {b}" for a, b in same.items()),
            flush=True,
        )
    labels = [n for n, _ in configs if n not in same]
    sweep = run_sweep(
        SWEEP_NAME,
        tasks,
        corpus=corpus,
        experiment=ctx.experiment,
        parent_run_id=ctx.parent_run_id,
        address=address,
        gpu_fraction=gpu_fraction,
        max_concurrent=concurrency,
        metrics=tuple(ctx.final_metrics),
        listen_clips=0,  # the search's listening page stays
        progress=progress,
        table={"title": "Held-out refits", "row_header": "configuration", "label_order": labels},
    )
    per_clip: dict[str, dict[str, dict[str, float]]] = {n: {} for n in labels}
    for r in sweep.rows:
        per_clip[r["label"]][r["clip_id"]] = {k: v for k, v in r.items() if k.startswith("eval/")}
    per_clip = {n: v for n, v in per_clip.items() if v}
    baseline = configs[0][0]
    result = HeldOutResult(
        corpus, [c.clip_id for c in clips], list(ctx.clips), configs, same.get(winner, winner), steps, length,
        None, "", "", how, failed=sweep.failed,
    )  # fmt: skip
    if baseline not in per_clip:
        result.verdict = f"VERDICT: none: the {baseline} refits failed ({sweep.failed} refits failed)"
        return result
    result.comparison = stats.compare(per_clip, baseline, COLUMNS, method=h.method)
    result.markdown = stats.comparison_markdown(
        result.comparison, f"Held-out clips ({steps} steps, {length:,} samples)"
    )
    result.verdict = stats.verdict(result.comparison, result.winner)
    _log(ctx, result)
    return result


def _log(ctx: SearchContext, r: HeldOutResult) -> None:
    """validation/ on the search's parent run: heldout.md, heldout.csv, intervals.png, clips.json."""
    assert r.comparison is not None
    parent = MlflowRun(ctx.experiment, uri=ctx.tracking_uri, run_id=ctx.parent_run_id)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        (out / "heldout.md").write_text(f"{r.note}\n\n{r.markdown}\n\n{r.verdict}\n")
        (out / "heldout.csv").write_text(rows_to_csv(stats.comparison_rows(r.comparison)))
        (out / "clips.json").write_text(
            json.dumps(
                {
                    "corpus": r.corpus,
                    "heldout": r.clips,
                    "searched": r.excluded,
                    "how": r.note,
                    "steps": r.steps,
                    "length": r.length,
                    "configurations": {n: p for n, p in r.configs},
                    "winner": r.winner,
                },
                indent=2,
            )
        )
        stats.save_figure(stats.interval_figure(r.comparison, "Held-out clips"), out / "intervals.png")
        parent.log_artifact(out, "validation")
        r.artifacts = sorted(f"validation/{p.name}" for p in out.iterdir())
    better, _ = r.comparison.beats(r.winner) if r.winner != r.comparison.baseline else ([], [])
    parent.log_metrics({"heldout/clips": len(r.clips), "heldout/winner_beats_paper": float(bool(better))})
