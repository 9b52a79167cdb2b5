"""fewsound.train without Ray: the schedule choice, the data stream, training state, and that training learns.

Real audio (the built-in corpus's speech), the real tiny FewSound model and the paper's loss; no mocks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewsound.errors import ConfigError
from fewsound.hyper import HyperConfig, build_model
from fewsound.train import (
    TrainConfig,
    choose_validation,
    load_training_state,
    make_optimizer,
    random_batches,
    run_epoch,
    save_training_state,
    state_digest,
    train,
    train_step,
)

CLIP = 2048  # the shortest window the loss's 2048-point STFT accepts: keeps these tests to seconds


def tiny(**kw) -> TrainConfig:
    model = HyperConfig(target="kan", preset="tiny", clip_length=CLIP)
    return TrainConfig(model=model, **{"lr": 2e-4, "batch_size": 4, "samples_per_epoch": 8, "epochs": 2, **kw})


@pytest.fixture(scope="module")
def speech_segments(speech_clips):
    """Six real speech recordings, 0.5 s in (past the leading silence), as [6, 8192] segments."""
    xs = [c.load() for c in speech_clips[:6]]
    return np.stack([x[11_025 : 11_025 + 4 * CLIP] for x in xs]).astype(np.float32)


def test_paper_schedule_batch_vs_epoch_stepping():
    """The paper's numbers: OneCycle planned over 2,500 x 625 steps. Stepped per batch it peaks at lr * 25 after
    5% of the steps; stepped per epoch (the paper's code, errata 9) it has barely moved after all 2,500 epochs."""
    cfg = TrainConfig()
    assert (cfg.steps_per_epoch, cfg.total_steps, cfg.resolved_lr) == (625, 1_562_500, 1e-5)
    assert TrainConfig(model=HyperConfig(target="siren")).resolved_lr == 1e-6
    opt, sched = make_optimizer(torch.nn.Linear(1, 1), cfg)
    opt.step()  # (no gradients: a no-op that keeps torch's "scheduler before optimizer" check quiet)
    assert math.isclose(opt.param_groups[0]["lr"], 1e-5, rel_tol=1e-9)
    for _ in range(cfg.epochs):  # "epoch": one scheduler step per epoch
        sched.step()
    epoch_lr = opt.param_groups[0]["lr"]
    assert 1e-5 < epoch_lr < 1.1e-5, epoch_lr
    opt, sched = make_optimizer(torch.nn.Linear(1, 1), cfg)
    opt.step()
    for _ in range(int(cfg.pct_start * cfg.total_steps) - 1):  # "batch": the warm-up ends at 5% of all steps
        sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 2.5e-4, rel_tol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "epoch"])
def test_run_epoch_steps_schedule_as_configured(mode, speech_segments):
    cfg = tiny(schedule_step=mode)
    model = build_model(cfg.model, verbose=False)
    opt, sched = make_optimizer(model, cfg)
    stream = random_batches(speech_segments, cfg.batch_size, CLIP, seed=0)
    stats = run_epoch(model, stream, opt, sched, cfg, 0)
    assert len(stats.losses) == cfg.steps_per_epoch == 2 and stats.samples == 8
    assert sched.last_epoch == (2 if mode == "batch" else 1)
    assert model.epoch == 1  # 1-based, as the paper's code: delta warm-up factor epoch / w


def test_config_errors():
    with pytest.raises(ConfigError, match="schedule_step"):
        TrainConfig(schedule_step="step")
    with pytest.raises(ConfigError, match="samples_per_epoch"):
        TrainConfig(batch_size=16, samples_per_epoch=8)
    with pytest.raises(ConfigError, match="val_metrics"):
        TrainConfig(val_metrics=("psnr", "nonsense"))
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1.0)


def test_rank_shares_make_up_the_global_batch(speech_segments):
    """Every rank takes rows rank::W of the same seeded global batch: together they are the 1-process batch."""
    one = random_batches(speech_segments, 4, CLIP, seed=3)
    two = [random_batches(speech_segments, 4, CLIP, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        full = next(one)
        a, b = next(two[0]), next(two[1])
        assert torch.equal(full[0::2], a) and torch.equal(full[1::2], b)
        assert torch.allclose(full.abs().amax(dim=1), torch.ones(4))  # peak-normalised after the crop


def test_choose_validation_is_fixed_and_covers_kinds():
    ids = [f"c{i}" for i in range(20)]
    kinds = ["speech"] * 14 + ["music"] * 4 + ["environment"] * 2
    subset, logged = choose_validation(ids, kinds, 10, 3)
    assert (subset, logged) == choose_validation(ids, kinds, 10, 3)
    assert len(subset) == 10 and subset == sorted(subset) and set(logged) <= set(subset)
    assert choose_validation(ids, kinds, 100, 3)[0] == list(range(20))
    everything, logged = choose_validation(ids, kinds, 100, 3)
    assert {kinds[i] for i in logged} == {"speech", "music", "environment"}


def test_training_state_round_trip(tmp_path, speech_segments):
    """Saved after a step and restored into a fresh model: the same digest, and the next step is bit-identical."""
    cfg = tiny()
    batch = next(random_batches(speech_segments, 4, CLIP, seed=1))
    a = build_model(cfg.model, verbose=False)
    opt_a, sched_a = make_optimizer(a, cfg)
    train_step(a, batch, opt_a, scheduler=sched_a)
    meta = save_training_state(tmp_path, a, opt_a, sched_a, cfg, epoch=0, step=1)
    b = build_model(cfg.model, verbose=False)
    opt_b, sched_b = make_optimizer(b, cfg)
    assert state_digest(b, opt_b, sched_b) != meta["digest"]
    loaded = load_training_state(tmp_path, b, opt_b, sched_b)
    assert loaded["digest_loaded"] == meta["digest"] == state_digest(a, opt_a, sched_a)
    train_step(a, batch, opt_a, scheduler=sched_a)
    train_step(b, batch, opt_b, scheduler=sched_b)
    assert state_digest(a, opt_a, sched_a) == state_digest(b, opt_b, sched_b)


def test_fewsound_learns_and_beats_its_universal_weights(speech_segments):
    """Six real speech windows: the training loss falls by over a third in 100 steps, and FewSound's
    reconstructions (its per-sound delta) beat the universal weights alone on every measure that matters."""
    segments = speech_segments[:, :CLIP]  # one fixed window per clip: "validation" = the clips it trained on
    cfg = tiny(
        batch_size=6, samples_per_epoch=60, epochs=10, val_every=10, val_metrics=("mse", "psnr", "si_snr", "lsd")
    )
    model, history, summaries = train(cfg, segments, segments, ["speech"] * 6)
    first, last = history[0].loss, history[-1].loss
    assert last < 0.7 * first, [round(h.loss, 4) for h in history]
    (v,) = summaries
    assert v["val/loss"] < 0.8 * v["universal/loss"], v
    assert v["eval/mse"] < v["universal/mse"] and v["eval/psnr"] > v["universal/psnr"], v
    assert v["eval/si_snr"] > v["universal/si_snr"] + 10, v
    assert v["val/clips"] == 6


@pytest.mark.integration
def test_evaluate_job_fewsound_checkpoint_vs_hypersound(tmp_path, speech_segments, capsys, monkeypatch):
    """jobs/evaluate_fewsound.py on a real prepared corpus: a FewSound training checkpoint folder and a
    HyperSound model file give Table 2's two rows and the long-audio rows, each model's results on a new MLflow
    run; a model given as a run id gets them on its own run; a bad --model is one line and exit code 2."""
    import csv
    import importlib.util
    import socket

    from mlflow.tracking import MlflowClient

    from fewsound import tracking
    from fewsound.data.prepare import prepare_corpus
    from fewsound.hyper import save_model
    from tune.spine import EVAL_KEY_TAG as EVAL_TAG

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("FEWSOUND_HOME", str(tmp_path))
    uri = tracking.start_local_server(home=tmp_path, port=port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    corpus = tmp_path / "corpus"
    prepare_corpus("builtin", out=corpus, protocol="fewsound")
    cfg = tiny()
    fs = build_model(cfg.model, verbose=False)
    opt, sched = make_optimizer(fs, cfg)
    train_step(fs, next(random_batches(speech_segments, 4, CLIP, seed=0)), opt, scheduler=sched)
    save_training_state(tmp_path / "ckpt" / "epoch_00001", fs, opt, sched, cfg, epoch=0, step=1)
    hs = build_model(cfg.model.replace(kind="hypersound"), verbose=False)
    save_model(tmp_path / "hs.pt", hs)
    trained = tracking.MlflowRun("train_fewsound")  # a model on its own run, as train_fewsound leaves it
    trained.log_artifact(save_model(tmp_path / "m" / "fewsound_model.pt", hs), "model_file")

    spec = importlib.util.spec_from_file_location("evaluate_fewsound", "jobs/evaluate_fewsound.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    try:
        common = ["--corpus", str(corpus), "--smoke-test"]
        rc = job.main(
            [
                "--model",
                str(tmp_path / "ckpt"),
                "--model",
                str(tmp_path / "hs.pt"),
                *common,
                "--out",
                str(tmp_path / "out"),
            ]
        )
        assert rc == 0
        table = capsys.readouterr().out
        assert job.main(["--model", trained.run_id, *common]) == 0
        capsys.readouterr()
        client = MlflowClient(uri)
        new = client.search_runs([client.get_experiment_by_name("evaluate_fewsound").experiment_id])
        own = client.get_run(trained.run_id)
    finally:
        tracking.stop_local_server(tmp_path)
    assert "| FewSound tiny |" in table and "| HyperSound |" in table, table
    assert "FewSound tiny, windowed" in table and "HyperSound, one window" in table, table
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert sorted({r["label"] for r in rows}) == ["FewSound tiny", "HyperSound"] and len(rows) == 8
    assert all(float(r["eval/mse"]) > 0 for r in rows)
    assert (tmp_path / "out" / "long_audio" / "table.md").exists()
    assert len(new) == 2 and all(r.data.tags[EVAL_TAG].startswith("eval-") for r in new)
    assert all({"evaluation/mse", "evaluation_long/mse"} <= set(r.data.metrics) for r in new)
    assert {r.data.params["model.kind"] for r in new} == {"fewsound", "hypersound"}
    assert own.data.tags[EVAL_TAG].startswith("eval-") and "evaluation/psnr" in own.data.metrics
    assert job.main(["--model", str(tmp_path / "missing.pt"), "--corpus", str(corpus), "--no-mlflow"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_train_job_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_fewsound", "jobs/train_fewsound.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    for argv, needle in (
        (["--set", "nonsense=1"], "nonsense"),
        (["--corpus", str(tmp_path / "nope")], "nope"),
        (["--schedule-step", "weekly"], "schedule_step"),
        (["--kind", "fewsund"], "hyper.kind"),
    ):
        assert job.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
    cfg = job.build_config(
        job.argparse.Namespace(
            kind="hypersound",
            target="siren",
            encoder="soundstream",
            preset="tiny",
            epochs=None,
            batch_size=None,
            lr=None,
            samples_per_epoch=None,
            val_every=None,
            val_clips=None,
            schedule_step="epoch",
            seed=None,
            metrics=None,
            smoke_test=False,
            phase_mangle=0.8,
            dequantize_bits=16,
            set=["model.delta_warmup_epochs=50", "val_every=5"],
        )
    )
    assert (cfg.model.kind, cfg.model.target, cfg.schedule_step, cfg.val_every) == ("hypersound", "siren", "epoch", 5)
    assert cfg.model.delta_warmup_epochs == 50 and cfg.resolved_lr == 1e-6
    assert (cfg.phase_mangle, cfg.dequantize_bits) == (0.8, 16)


# ------------------------------------------------------------------------------------------------ augmentations


def test_phase_mangle_keeps_the_magnitude_spectrum_and_changes_the_waveform(speech_segments):
    """The all-pass biquad has unit gain at every frequency, so a real speech crop (zero-padded so that the
    filter's tail fits) keeps its magnitude spectrum while its waveform changes; p=0 is the identity."""
    from scipy.signal import lfilter

    from fewsound.train import allpass_coefficients, phase_mangle

    for freq in (20.0, 300.0, 2000.0):
        impulse = np.zeros(1 << 16)
        impulse[0] = 1.0
        gain = np.abs(np.fft.rfft(lfilter(*allpass_coefficients(freq, 22_050), impulse)))
        assert np.allclose(gain, 1.0, atol=1e-6), (freq, gain.min(), gain.max())
    x = np.concatenate([speech_segments[:3], np.zeros((3, 1 << 14), np.float32)], axis=1)
    y = phase_mangle(x, np.random.default_rng(0), 22_050, p=1.0)
    assert y.shape == x.shape and y.dtype == np.float32
    for xi, yi in zip(x, y):
        sx, sy = np.abs(np.fft.rfft(xi)), np.abs(np.fft.rfft(yi))
        assert np.allclose(sy, sx, rtol=1e-3, atol=1e-3 * sx.max())
        assert np.linalg.norm(yi - xi) > 0.05 * np.linalg.norm(xi)  # the phase (hence the waveform) moved
    assert np.array_equal(phase_mangle(x, np.random.default_rng(0), 22_050, p=0.0), x)
    some = phase_mangle(np.repeat(x[:1], 200, axis=0), np.random.default_rng(1), 22_050, p=0.8)
    changed = np.mean([not np.array_equal(r, x[0]) for r in some])
    assert 0.7 < changed < 0.9  # each crop is filtered with probability p


def test_dequantize_adds_one_quantisation_step_of_uniform_noise(speech_segments):
    from fewsound.train import dequantize

    x = speech_segments[:4]
    noise = dequantize(x, np.random.default_rng(0), bits=16).astype(np.float64) - x
    step = 2.0**-16
    assert np.abs(noise).max() <= 0.5 * step * 1.01  # float32 rounding of x + noise
    assert abs(noise.mean()) < 0.01 * step
    assert noise.std() == pytest.approx(step / math.sqrt(12), rel=0.05)


def test_augmentations_are_off_by_default_and_applied_to_training_crops_only(speech_segments):
    """Default config: no augmentation and the very same crops as before; with both on, the crops differ and are
    still peak-normalised."""
    from fewsound.train import crop_batch

    assert tiny().augment is None
    plain = next(random_batches(speech_segments, 4, CLIP, seed=2))
    expected = crop_batch(
        speech_segments[np.random.default_rng([2, 0]).permutation(6)[:4]], CLIP, np.random.default_rng([2, 1])
    )
    assert torch.equal(plain, expected)
    cfg = tiny(phase_mangle=1.0, dequantize_bits=16)
    aug = next(random_batches(speech_segments, 4, CLIP, seed=2, augment=cfg.augment))
    assert not torch.allclose(aug, plain, atol=1e-3)
    assert torch.allclose(aug.abs().amax(dim=1), torch.ones(4))

    # train() with the augmentations on, judged from outside the stream's seeding:
    from fewsound.train import summarize_validation, validate

    def run(**kw):
        return train(
            tiny(epochs=1, val_metrics=("mse",), **kw), speech_segments[:4], speech_segments[4:], ["speech"] * 2
        )

    model, history, (summary,) = run(phase_mangle=1.0, dequantize_bits=16)
    _, plain_history, _ = run()
    # training crops ARE augmented: the first step (the same init, the same crop starts) sees other samples
    assert history[0].losses[0] != plain_history[0].losses[0], (history[0].losses, plain_history[0].losses)
    # validation crops are NOT: the clips' first CLIP samples, peak-normalised here with numpy, give the
    # validation train() reported for its final model
    first = speech_segments[4:, :CLIP].astype(np.float64)
    clean = (first / np.abs(first).max(axis=1, keepdims=True)).astype(np.float32)
    again = summarize_validation(validate(model, clean, ["speech"] * 2, tiny(val_metrics=("mse",))))
    assert {k: summary[k] for k in again} == again
    with pytest.raises(ConfigError, match="phase_mangle"):
        tiny(phase_mangle=1.5)
    with pytest.raises(ConfigError, match="dequantize_bits"):
        tiny(dequantize_bits=-1)


def test_progress_lines_give_samples_per_s_and_the_eta_of_the_remaining_steps(capfd):
    """A resumed run (from epoch 2 of 10, 20 steps each) that spends 0.5 s per step after a 60 s start-up: the
    ETA counts only the steps still to do, at the pace measured since this session's first step; in-epoch lines
    come at most every `every_s`."""
    from tune.hyper.worker import Progress

    cfg = tiny(epochs=10, batch_size=4, samples_per_epoch=80)
    now = [100.0]
    p = Progress(cfg, start_epoch=2, world=2, every_s=3.0, clock=lambda: now[0])
    now[0] += 60.0  # start-up (data, DDP) before the first step: not the pace of training
    for step in range(1, 21):
        now[0] += 0.5
        p.on_step(step, samples=2 * step, seconds=0.5 * step)
    lines = [x for x in capfd.readouterr().out.splitlines() if x.startswith("[train]")]
    assert len(lines) == 4, lines  # at step 1 (60 s since the last line: no pace yet), then every 3 s: 7, 13, 19
    assert lines[0].endswith("ETA ?"), lines[0]
    assert lines[1] == "[train] epoch 3/10 step 7/20 (47/200)  8.0 samples/s  ETA 1m16s", lines[1]  # 3 s / 6 steps
    metrics = {"train/loss": 0.5, "cost/samples_per_s": 8.0, "cost/epoch_seconds": 10.0}
    line = p.epoch_line(2, 60, metrics)
    assert metrics["progress/eta_seconds"] == pytest.approx(0.5 * 140)  # 7 epochs of 20 steps left, 0.5 s each
    assert "ETA 1m10s" in line and "8.0 samples/s" in line and line.startswith("[train] epoch 3/10 step 60/200")
