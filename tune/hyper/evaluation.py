"""Evaluating a trained FewSound / HyperSound model, and its record in MLflow: what jobs/evaluate_fewsound.py and
jobs/hyper_tables.py share.

    ev = evaluate_trained(model, corpus, label="FewSound-NERF", long_seconds=10.0)
    log_evaluation(run_id, ev, key=evaluation_key(...))        # rows, tables and means on the model's run
    ev = load_evaluation(run_id, key)                          # a re-run finds it there (None: evaluate again)

Rows are the paper's table rows (fewsound.tables), one per validation clip: the deterministic crop (start 0) of
the model's clip length, every metric that applies to the clip's kind.

Long audio: the model's window is 1.5 s (tiny preset: 0.19 s) but real audio is longer. A long clip is made of
one speaker's validation segments put end to end (each corpus segment is a few seconds; a speaker's segments are
different utterances, so the seams are real cuts, as in any long recording) and cropped to `long_seconds`; the
model reconstructs it window by window with crossfades (fewsound.hyper.reconstruct_long). Two rows per long
clip: "windowed" (the whole clip against its reconstruction) and "one window" (the clip's first window alone,
reconstructed as one window): the gap is what stitching costs. Both rows carry the long clip's length so that
they sit in one table group.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fewsound.config import cfg_hash
from fewsound.errors import ConfigError, DataError
from tune.spine import EVAL_KEY_TAG

EVAL_DIR = "evaluation"
LONG_GROUP = "long audio"
# What the grid's evaluation task asks Ray for (eval_resources): up to EVAL_CPUS CPUs (torch threads for the model
# and CDPAM, the metrics' own work) and EVAL_GPU of a GPU where jobs use GPUs (the model's reconstructions and
# CDPAM on the device: the model is small, a share leaves the rest of the card to trainings).
EVAL_CPUS = 4
EVAL_GPU = 0.25


def eval_resources(node_cpus: Sequence[float], gpus: bool) -> dict[str, float]:
    """Ray options of one evaluation: num_cpus = EVAL_CPUS, at most the largest node's CPUs less one (left to the
    trainings' data readers), at least 1; num_gpus = EVAL_GPU when `gpus` (the job uses GPUs)."""
    largest = max(node_cpus, default=0.0)
    res: dict[str, float] = {"num_cpus": float(max(1, min(EVAL_CPUS, int(largest) - 1)))}
    if gpus:
        res["num_gpus"] = EVAL_GPU
    return res


def evaluate_run(run_id: str, tracking: str, corpus: str, *, label: str, **options: Any) -> Evaluation:
    """A Ray task body: the trained model of MLflow run `run_id`, evaluated (evaluate_trained(**options)) on the
    device the task was given (its GPU share, else the CPU: a task given no GPU hides them) at one torch thread
    per CPU it was given."""
    import ray
    import torch

    from fewsound.device import resolve_device
    from fewsound.hyper.trained import load_trained
    from tune.ray_env import cpu_means_cpu

    cpu_means_cpu()
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    model = load_trained(run_id, tracking=tracking).to(resolve_device("auto"))
    segments, meta = validation_set(corpus, options.pop("clips", None))
    return evaluate_trained(model, segments, meta, label=label, **options)


@dataclasses.dataclass
class Evaluation:
    rows: list[dict[str, Any]]  # one per validation clip, labelled with the model's description
    long_rows: list[dict[str, Any]]  # two per long clip: windowed and one window
    example_id: str | None = None  # the validation clip of the spectrogram grid
    example: np.ndarray | None = None  # [N] the model's reconstruction of it
    example_ref: np.ndarray | None = None  # [N] the clip itself


def validation_set(corpus: str, clips: int | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(segments [V, L], per-clip meta with clip_id/kind/speaker) of the corpus's validation split."""
    from fewsound.data.corpus import open_corpus

    segments, meta = open_corpus(corpus).arrays("validation")
    if clips is not None:
        if clips < 1:
            raise ConfigError("--clips", f"must be >= 1, got {clips}")
        segments, meta = segments[:clips], meta[:clips]
    return segments, meta


def long_clips(
    segments: np.ndarray, meta: Sequence[dict[str, Any]], seconds: float, sample_rate: int
) -> list[tuple[str, str, np.ndarray]]:
    """(id, kind, audio [n]) per speaker whose validation segments, end to end, last at least `seconds`
    (cropped to exactly that). Raises DataError when no speaker has that much audio."""
    n = int(round(seconds * sample_rate))
    by_speaker: dict[str, list[int]] = defaultdict(list)
    for i, m in enumerate(meta):
        by_speaker[str(m.get("speaker") or m["clip_id"])].append(i)
    out = []
    for speaker, idx in by_speaker.items():
        audio = np.concatenate([segments[i] for i in idx]).astype(np.float32)
        if audio.size >= n:
            out.append((f"{speaker} ({len(idx)} segments, {seconds:g} s)", meta[idx[0]]["kind"], audio[:n]))
    if not out:
        longest = max(sum(segments[i].size for i in idx) for idx in by_speaker.values()) / sample_rate
        raise DataError(
            "validation split", f"no speaker has {seconds:g} s of audio (at most {longest:.1f} s): lower --long-seconds"
        )
    return out


def evaluate_long(
    model: Any,
    clips: list[tuple[str, str, np.ndarray]],
    *,
    label: str,
    metrics: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows "<label>, windowed" (a long clip against its window-by-window reconstruction) and "<label>, one
    window" (its first window alone) per long clip."""
    from fewsound.hyper import reconstruct_long
    from fewsound.metrics import evaluate, to_mlflow

    cfg = model.config
    window, sr = cfg.clip_length, cfg.sample_rate
    params = float(model.param_counts()["total"])
    rows = []
    for clip_id, kind, audio in clips:
        whole = reconstruct_long(model, audio).numpy()
        first = reconstruct_long(model, audio[:window]).numpy()
        for name, ref, rec in (("windowed", audio, whole), ("one window", audio[:window], first)):
            (res,) = evaluate(ref[None], rec[None], sr, kind, metrics, names=[clip_id])
            rows.append(
                {
                    "label": f"{label}, {name}",
                    "variant": name,
                    "group": LONG_GROUP,
                    "length": int(audio.size),
                    "window": window,
                    "clip_id": clip_id,
                    "kind": kind,
                    **to_mlflow(res),
                    "model/params": params,
                }
            )
    return rows


def example_clip(meta: Sequence[dict[str, Any]]) -> int:
    """The validation clip shown in the spectrogram grids: the first speech clip, else the first clip."""
    return next((i for i, m in enumerate(meta) if m["kind"] == "speech"), 0)


def evaluate_trained(
    model: Any,
    segments: np.ndarray,
    meta: Sequence[dict[str, Any]],
    *,
    label: str,
    metrics: Sequence[str] | None = None,
    long_seconds: float | None = None,
) -> Evaluation:
    """The table rows of `model` on validation segments [V, L], its long-audio rows when `long_seconds`, and its
    reconstruction of the example clip."""
    from fewsound.train import evaluate_model, reconstruct, validation_crop

    ids, kinds = [m["clip_id"] for m in meta], [m["kind"] for m in meta]
    rows = evaluate_model(model, segments, kinds, ids, label=label, metrics=metrics)
    long_rows = []
    if long_seconds:
        clips = long_clips(segments, meta, long_seconds, model.config.sample_rate)
        long_rows = evaluate_long(model, clips, label=label, metrics=metrics)
    i = example_clip(meta)
    ref = validation_crop(segments[i : i + 1], model.config.clip_length)
    return Evaluation(rows, long_rows, ids[i], reconstruct(model, ref)[0], ref[0])


def evaluation_key(model_id: str, corpus: str, clips: int | None, metrics: Any, long_seconds: float | None) -> str:
    """What identifies an evaluation: the model (its training key or run), the corpus and the options."""
    return "eval-" + cfg_hash(
        {"model": model_id, "corpus": corpus, "clips": clips, "metrics": metrics, "long": long_seconds}
    )


def _means(rows: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        for k, v in r.items():
            if k.startswith("eval/") and isinstance(v, (int, float)) and math.isfinite(v):
                acc[k].append(float(v))
    return {f"{prefix}/{k[len('eval/') :]}": float(np.mean(v)) for k, v in acc.items()}


def log_evaluation(run: Any, ev: Evaluation, key: str, *, title: str, sample_rate: int) -> None:
    """On the model's MLflow run (a fewsound.tracking.MlflowRun): evaluation/rows.json (every row, exact),
    evaluation/table.* and evaluation/long/table.* (fewsound.tables), the example clip's audio, the means as
    metrics `evaluation/<metric>` and `evaluation_long/<metric>`, and the tag that lets a re-run skip it."""
    from fewsound.data.audio import save_audio
    from fewsound.tables import write_results

    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        write_results(out, ev.rows, title=title, row_header="Model")
        if ev.long_rows:
            write_results(out / "long", ev.long_rows, title=f"{title}: long audio", row_header="Model")
        payload = {"rows": ev.rows, "long_rows": ev.long_rows, "example_id": ev.example_id}
        (out / "rows.json").write_text(json.dumps(payload))
        if ev.example is not None:
            save_audio(out / "example_pred.wav", ev.example, sample_rate)
            save_audio(out / "example_gt.wav", ev.example_ref, sample_rate)
        run.log_artifact(out, EVAL_DIR)
    run.log_metrics({**_means(ev.rows, "evaluation"), **_means(ev.long_rows, "evaluation_long")})
    run.set_tags({EVAL_KEY_TAG: key})


def load_evaluation(run: Any, key: str) -> Evaluation | None:
    """The evaluation `key` logged on `run` by `log_evaluation`, or None when the run holds no such evaluation."""
    from fewsound.data.audio import read_audio

    tags = run.client.get_run(run.run_id).data.tags
    if tags.get(EVAL_KEY_TAG) != key:
        return None
    with tempfile.TemporaryDirectory() as d:
        try:
            local = Path(run.client.download_artifacts(run.run_id, EVAL_DIR, d))
        except Exception:  # noqa: BLE001 - tagged but its files are gone: evaluate again
            return None
        payload = json.loads((local / "rows.json").read_text())
        example = ref = None
        if (local / "example_pred.wav").exists():
            example, _ = read_audio(local / "example_pred.wav")
            ref, _ = read_audio(local / "example_gt.wav")
    return Evaluation(payload["rows"], payload["long_rows"], payload.get("example_id"), example, ref)
