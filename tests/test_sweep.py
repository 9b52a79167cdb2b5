"""Sweeps end to end on a real local Ray, a real MLflow server over HTTP and the built-in corpus's real speech.

One Ray (2 CPUs) and one MLflow server serve the whole module: the smoke job, its report, a divergence, a
crashing trial and the jobs' bad-input errors. Resume after SIGKILL is in test_sweep_resume.py, GPU fractions in
test_sweep_gpu.py (each needs its own Ray).
"""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import REPO  # tests/support.py

from fewsound import tracking
from fewsound.fit import FitConfig
from fewsound.plan import FitTask
from tune.spine import FIT_KEY_TAG, REASON_TAG, TARGET_AUDIO_TAG

EVAL_KEYS = (
    "eval/mse",
    "eval/psnr",
    "eval/snr",
    "eval/si_snr",
    "eval/lsd",
    "eval/wd_hf",
    "eval/pesq",
    "eval/stoi",
    "eval/cdpam",
)
FIT_KEYS = ("fit/loss", "cost/seconds", "cost/steps_per_s", "model/params")


@pytest.fixture(scope="module")
def ray_local(env):
    """A local Ray of this module's own with 2 CPUs, whatever the machine has: a Ray that an earlier module left
    running in this process (with its CPU count and another FEWSOUND_HOME in its workers) is shut down first."""
    import ray

    from tune.ray_env import init_ray, quiet_defaults

    quiet_defaults()
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)  # start one here, never join another
        init_ray(num_cpus=2)
    assert ray.cluster_resources().get("CPU") == 2 and not ray.cluster_resources().get("GPU")

    @ray.remote(num_cpus=1)
    def worker_home() -> str | None:
        return os.environ.get("FEWSOUND_HOME")

    assert ray.get(worker_home.remote()) == str(env[0])  # the workers see this module's home
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def client(env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=env[1])


def children(client, experiment: str) -> tuple[object, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("fewsound.role") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    kids = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parents[0].info.run_id]
    return parents[0], kids


@pytest.fixture(scope="module")
def smoke(ray_local, client):
    """`jobs/fit_inrs.py --smoke-test`, in this process (on this module's Ray): its exit code and output."""
    import contextlib

    sys.path.insert(0, str(REPO / "jobs"))
    import fit_inrs

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = fit_inrs.main(["--smoke-test"])
    return rc, buf.getvalue()


def test_smoke_job_logs_parent_and_six_children_with_metrics_and_artifacts(smoke, client, tmp_path):
    rc, out = smoke
    assert rc == 0, out
    _, kids = children(client, "fit_inrs-smoke")
    assert len(kids) == 6
    assert {r.data.tags["fewsound.family"] for r in kids} == {"nerf", "kan"}
    for r in kids:
        assert r.info.status == "FINISHED", (r.info.run_name, r.data.tags.get(REASON_TAG))
        assert r.data.tags[FIT_KEY_TAG] == r.info.run_name
        assert r.data.tags.get("mlflow.source.git.commit")
        missing = [k for k in EVAL_KEYS + FIT_KEYS if k not in r.data.metrics]
        assert not missing, (r.info.run_name, missing, r.data.tags)
        assert all(math.isfinite(v) for v in r.data.metrics.values())
        assert r.data.params["clip.length"] == "16384" and r.data.params["fit.steps"] == "5"
    # artifacts travel over HTTP: read one fit's back and check they are its audio and a PNG; the target is logged
    # once per clip and length on the parent run, and each fit's run names it
    run = kids[0]
    parent, _ = children(client, "fit_inrs-smoke")
    d = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    import soundfile as sf

    target = run.data.tags[TARGET_AUDIO_TAG]
    assert target.startswith("targets/") and target.endswith("-16384-22050.flac"), target
    gt, sr = sf.read(client.download_artifacts(parent.info.run_id, target, str(tmp_path / "t")), dtype="float32")
    pred, pred_sr = sf.read(d / "audio" / "pred.flac", dtype="float32")
    assert sr == pred_sr == 22_050 and gt.shape == pred.shape == (16_384,)
    assert sf.info(str(d / "audio" / "pred.flac")).subtype == "PCM_16"  # quantized: the metrics came first
    assert np.isclose(np.abs(gt).max(), 1.0, atol=1e-4)  # peak-normalised, as fitted
    mse = float(np.mean((gt - pred) ** 2))
    assert mse == pytest.approx(run.data.metrics["eval/mse"], rel=1e-4)
    png = (d / "plots" / "spectrogram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    assert image.mode == "P" and image.width > 3 * 240 and image.height > 160  # three panels, palette pixels
    # the parent holds each clip's target once: one per clip (the smoke test fits 3 clips with 2 families)
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "targets")}
    assert names == {r.data.tags[TARGET_AUDIO_TAG] for r in kids} and len(names) == 3, names
    # the parent compares: the table and quality against parameter count (one point per INR)
    plots = [a.path for a in client.list_artifacts(parent.info.run_id, "plots")]
    assert plots == ["plots/quality_vs_params.png"]
    png = Path(client.download_artifacts(parent.info.run_id, plots[0], str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    exp = client.get_experiment_by_name("fit_inrs-smoke")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs, not traces
    # every other run has its two files too
    for r in kids[1:]:
        files = {a.path for a in client.list_artifacts(r.info.run_id, "audio")}
        files |= {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
        assert files == {"audio/pred.flac", "plots/spectrogram.png"}


def test_smoke_output_is_quiet_progress_lines_table_and_ui_address(smoke):
    rc, out = smoke
    lines = out.splitlines()
    asked = (
        "[fit_inrs] planning for 0 GPUs, 2 CPUs (the resources up now; set FEWSOUND_MAX_GPUS/FEWSOUND_MAX_CPUS to "
        "plan for an autoscaler): 2 trial slots of 1 CPU"
    )
    assert asked in lines and lines.index(asked) < min(i for i, x in enumerate(lines) if "] done " in x), out
    progress = [line for line in lines if line.startswith("[fit_inrs] done")]
    assert len(progress) == 2  # one per trial (2 packs of 3 fits)
    assert progress[-1].split()[1:7] == ["done", "6", "failed", "0", "remaining", "0"]
    assert "fits/h" in progress[-1] and "ETA" in progress[-1]
    assert "| NERF |" in out and "| KAN |" in out
    assert "MLflow UI: http://127.0.0.1:" in out
    for noise in (
        "View run",
        "View experiment",
        "Configuration for experiment",
        "View detailed results",
        "tensorboard",
        "Traceback",
    ):
        assert noise not in out, noise


def test_parent_tables_parse_and_match_the_child_runs(smoke, client, tmp_path):
    parent, kids = children(client, "fit_inrs-smoke")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/done"] == 6 and parent.data.metrics["sweep/failed"] == 0
    d = Path(client.download_artifacts(parent.info.run_id, "tables", str(tmp_path)))
    rows = list(csv.DictReader(io.StringIO((d / "table.csv").read_text())))
    label = {"nerf": "NERF", "kan": "KAN"}
    seen = set()
    for row in rows:
        key = {
            "MSE": "eval/mse",
            "PSNR": "eval/psnr",
            "LSD": "eval/lsd",
            "SI-SNR": "eval/si_snr",
            "PESQ": "eval/pesq",
            "STOI": "eval/stoi",
            "CDPAM": "eval/cdpam",
            "WD": "eval/wd_hf",
        }[row["metric"]]
        xs = [r.data.metrics[key] for r in kids if label[r.data.tags["fewsound.family"]] == row["INR"]]
        assert int(row["n"]) == len(xs) == 3
        assert float(row["mean"]) == pytest.approx(np.mean(xs), rel=1e-9, abs=1e-12)
        assert float(row["std"]) == pytest.approx(np.std(xs), rel=1e-6, abs=1e-12)  # population std over clips
        params = {
            int(r.data.metrics["model/params"]) for r in kids if label[r.data.tags["fewsound.family"]] == row["INR"]
        }
        assert {int(row["params"])} == params
        seen.add((row["INR"], row["metric"]))
    assert len(seen) == 2 * 8  # both families x every metric column
    md = (d / "table.md").read_text()
    lines = [x for x in md.splitlines() if x.startswith("| NERF") or x.startswith("| KAN")]
    assert len(lines) == 2
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == "3" and len(cells) == 3 + 8
        assert all("±" in c for c in cells[3:])
    per_fit = list(csv.DictReader(io.StringIO((d / "results.csv").read_text())))
    assert sorted(r["key"] for r in per_fit) == sorted(r.info.run_name for r in kids)


def test_a_diverging_fit_is_failed_with_its_reason_and_the_others_finish(ray_local, client, env):
    from tune.jobs import corpus_clips, resolve_corpus
    from tune.sweep import run_sweep

    corpus = resolve_corpus(None, 4096)
    clips = corpus_clips(corpus, "2", "speech")
    # SIREN at lr=1e6 really diverges (non-finite loss at step 2); NERF at its default rate does not
    tasks = [
        FitTask(FitConfig(family=f, steps=4, lr=lr), c.clip_id, c.kind, 4096, f)
        for f, lr in (("nerf", None), ("siren", 1e6))
        for c in clips
    ]
    s = run_sweep(
        "diverge",
        tasks,
        corpus=corpus,
        experiment="test-diverge",
        max_retries=1,
        progress=False,
        metrics=("mse", "psnr"),
        log_artifacts=False,
    )
    assert (s.done, s.failed) == (2, 2)
    parent, kids = children(client, "test-diverge")
    assert parent.info.status == "FAILED"  # the sweep finished, and says that some fits failed
    by_family = {}
    for r in kids:
        by_family.setdefault(r.data.tags["fewsound.family"], []).append(r)
    assert all(r.info.status == "FINISHED" and "eval/mse" in r.data.metrics for r in by_family["nerf"])
    for r in by_family["siren"]:
        assert r.info.status == "FAILED"
        assert r.data.tags[REASON_TAG].startswith("diverged at step ")
        assert r.data.tags["fewsound.attempts"] == "2"  # the first fit and one retry with a new seed
        assert "fit/loss" in r.data.metrics and "eval/mse" not in r.data.metrics
    assert not client.list_artifacts(by_family["siren"][0].info.run_id)


def test_a_crashing_trial_is_retried_then_its_fits_are_failed_with_the_reason(ray_local, client, env, capfd):
    from tune.jobs import corpus_clips, resolve_corpus
    from tune.sweep import run_sweep

    corpus = resolve_corpus(None, 4096)
    good = corpus_clips(corpus, "1", "speech")[0]
    # a clip the corpus does not have: the trial raises (KeyError) on every attempt
    tasks = [
        FitTask(FitConfig(family="nerf", steps=2), good.clip_id, "speech", 4096, "nerf"),
        FitTask(FitConfig(family="rff", steps=2), "no-such-clip", "speech", 4096, "rff"),
    ]
    s = run_sweep(
        "crash",
        tasks,
        corpus=corpus,
        experiment="test-crash",
        trial_failures=1,
        metrics=("mse",),
        log_artifacts=False,
    )
    assert (s.done, s.failed) == (1, 1)
    out, err = capfd.readouterr()
    # the failure reaches the user once, in one line with its reason, without Tune's tracebacks
    (line,) = [x for x in out.splitlines() if " FAILED " in x]
    assert line.startswith("[crash] FAILED rff-no-such-clip-") and "has no clip 'no-such-clip'" in line, line
    assert "Traceback" not in out + err, (out + err)[-3000:]
    _, kids = children(client, "test-crash")
    failed = [r for r in kids if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["fewsound.family"] == "rff"
    assert (
        failed[0].data.tags[REASON_TAG].startswith("trial crashed:")
        and "no-such-clip" in failed[0].data.tags[REASON_TAG]
    )


def test_every_worker_of_a_job_quiets_exits_from_its_start(ray_local):
    """init_ray's setup hook runs in each worker before anything else (a trial actor that Ray ends with SIGTERM
    before its trainable ran included): there a SystemExit raised in a finalizer prints nothing, and any other
    exception raised there still prints."""
    import ray

    @ray.remote(num_cpus=1)
    def unraisables() -> tuple[bool, str, str]:  # a plain task: no trainable, no call to quiet_exits
        import contextlib
        import io
        import sys

        class Finalizer:
            def __init__(self, exc: BaseException):
                self.exc = exc

            def __del__(self):
                raise self.exc  # Python cannot raise from a finalizer: it goes to sys.unraisablehook

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            Finalizer(SystemExit(1))  # freed at once (reference counting): what Ray's SIGTERM handler raises
            quiet = err.getvalue()
            Finalizer(ValueError("a real error"))
        return getattr(sys.unraisablehook, "fewsound_quiet_exits", False), quiet, err.getvalue()

    hooked, quiet, loud = ray.get(unraisables.remote())
    assert hooked and quiet == ""
    assert "Exception ignored in" in loud and "ValueError: a real error" in loud, loud


def test_packs_bundled_into_one_trial_report_one_by_one_and_a_crashing_pack_spares_the_others(ray_local, client, env):
    from tune.jobs import corpus_clips, resolve_corpus
    from tune.sweep import run_sweep

    corpus = resolve_corpus(None, 4096)
    good = corpus_clips(corpus, "1", "speech")[0]
    # 3 packs on 2 slots, one trial per slot: pack 0 (the crashing one) shares its trial with pack 2
    tasks = [
        FitTask(FitConfig(family="rff", steps=2, seed=7), "no-such-clip", "speech", 4096, "rff"),
        FitTask(FitConfig(family="nerf", steps=2, seed=7), good.clip_id, "speech", 4096, "nerf"),
        FitTask(FitConfig(family="siren", steps=2, seed=7), good.clip_id, "speech", 4096, "siren"),
    ]
    s = run_sweep(
        "bundled",
        tasks,
        corpus=corpus,
        experiment="test-bundled",
        trial_failures=1,
        progress=False,
        metrics=("mse",),
        log_artifacts=False,
        trials_per_slot=1,
    )
    assert s.n_trials == 2 and (s.done, s.failed) == (2, 1)
    # pack 2 ran in the crashing pack's trial, on its first attempt and again on the retry (finding its fit done)
    by_pack = {}
    for p in s.packs:
        by_pack.setdefault(p["pack"], []).append(p)
    assert by_pack[2][0]["trial"] == 0 and by_pack[1][0]["trial"] == 1 and 0 not in by_pack
    assert [(p["fits_done"], p["fits_skipped"]) for p in by_pack[2]] == [(1, 0), (0, 1)]
    _, kids = children(client, "test-bundled")
    status = {r.data.tags["fewsound.family"]: r.info.status for r in kids}
    assert status == {"rff": "FAILED", "nerf": "FINISHED", "siren": "FINISHED"}
    failed = [r for r in kids if r.info.status == "FAILED"][0]
    assert "no-such-clip" in failed.data.tags[REASON_TAG]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--corpus", "/nonexistent/corpus", "--steps", "2"], "/nonexistent/corpus: no such corpus folder"),
        (["--gpu-fraction", "0.3", "--families", "nerf"], "gpu_fraction: 0.3 does not divide one GPU"),
        (["--trials-per-slot", "-1", "--families", "nerf"], "trials_per_slot: need >= 1"),
        (["--steps", "2", "--max-concurrent", "0"], "--max-concurrent: need >= 1"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(env, args, expect, capsys):
    """The job's main() in this process: exit code 2 and one line naming the option or file."""
    from sweep_jobs import job

    assert job("fit_inrs").main(args) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    lines = [x for x in out.err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], out.err


def test_bad_input_from_the_command_line(env):
    """One case as a user runs it: a fresh interpreter, the script by its path."""
    p = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "fit_inrs.py"), "--families", "nerf,transformer"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--families: unknown value(s) ['transformer']" in lines[0], p.stderr


@pytest.mark.parametrize(
    "job_name, args",
    [
        ("fit_inrs", ["--steps", "0"]),
        ("kan_ablation", ["--steps", "-5"]),
        ("fit_inrs", ["--pack-size", "0"]),
        ("train_fewsound", ["--epochs", "0"]),
    ],
)
def test_counts_below_one_are_refused_in_one_line(job_name, args, capsys):
    """`--steps 0` would start a whole sweep of untrained networks: refused before anything starts."""
    from sweep_jobs import job

    with pytest.raises(SystemExit) as exit_:
        job(job_name).main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {args[0]}: must be >= 1" in err and "usage:" not in err, err
