"""`python -m fewsound fit`: the real command on a real recording, and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from fewsound.cli import main
from fewsound.data.audio import load_audio

SR = 22_050


@pytest.fixture
def run_cli(processes):
    """The real command in a fresh interpreter, as a user runs it (tests/conftest.py's `processes`)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return processes.run([sys.executable, "-m", "fewsound", "fit", *map(str, args)], timeout=300)

    return run


def run_main(capsys, *args) -> tuple[int, str, str]:
    """The same command line through fewsound.cli.main in this process (no interpreter start-up per case)."""
    code = main(["fit", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def speech_wav(speech_clips, tmp_path_factory):
    """A real speech recording written as a WAV at 16 kHz (the command resamples it to 22,050 Hz)."""
    clip = next(c for c in speech_clips if c.n_samples >= 2 * 8192)
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    x = clip.load(sr=16_000)
    sf.write(path, x, 16_000, subtype="PCM_16")
    return path


def test_fit_round_trip(speech_wav, tmp_path, run_cli):
    out = tmp_path / "out"
    proc = run_cli(
        speech_wav,
        "--inr",
        "nerf",
        "--steps",
        "40",
        "--length",
        "8192",
        "--offset",
        "4000",
        "--out",
        out,
        "--metrics",
        "mse,psnr,si_snr,lsd",
        "--log-every",
        "20",
    )
    assert proc.returncode == 0, proc.stderr
    assert "step     40" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "gt.wav",
        "metrics.json",
        "params.pt",
        "pred.wav",
        "spectrogram.png",
    ]
    gt, gt_sr = sf.read(out / "gt.wav", dtype="float32")
    pred, pred_sr = sf.read(out / "pred.wav", dtype="float32")
    assert gt_sr == pred_sr == SR and gt.shape == pred.shape == (8192,)
    assert np.abs(gt).max() == pytest.approx(1.0)  # peak-normalised target
    # gt.wav is the requested crop of the resampled file
    np.testing.assert_allclose(
        gt, (lambda x: x / np.abs(x).max())(load_audio(speech_wav, sr=SR)[4000:12192]), atol=1e-6
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("fit/loss", "eval/mse", "eval/psnr", "eval/si_snr", "eval/lsd", "cost/steps_per_s", "model/params"):
        assert isinstance(metrics[key], float), key
    assert metrics["eval/mse"] == pytest.approx(float(np.mean((gt - pred) ** 2)), rel=1e-3)
    assert metrics["model/params"] == 33_261 and metrics["fit/steps"] == 40 and metrics["fit/diverged"] is False
    assert metrics["config"]["family"] == "nerf" and metrics["config"]["lr"] == 1e-3
    assert (out / "spectrogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _logged_losses(stdout: str) -> dict[int, str]:
    """step -> the loss as printed, from the command's `step N  loss L` lines."""
    return {int(line.split()[1]): line.split()[3] for line in stdout.splitlines() if line.startswith("step ")}


@pytest.mark.system  # a SIGKILL mid-run
def test_a_fit_killed_mid_run_resumes_from_its_last_checkpoint(speech_wav, tmp_path, capsys, processes):
    """A real `fewsound fit` process SIGKILLed after its first checkpoint: `--resume` runs only the steps after the
    checkpoint's, its loss curve goes on as the uninterrupted fit's does, and it ends where that fit ends; a
    finished checkpoint is reused as it is."""
    import signal

    import torch

    steps, every = 12, 3
    common = [speech_wav, "--inr", "kan", "--steps", steps, "--length", "4096", "--metrics", "mse",
              "--checkpoint-every", every, "--log-every", "1"]  # fmt: skip
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fewsound", "fit", *map(str, common), "--out", str(out)]
    proc = processes.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:  # the step after the first checkpoint has run: that checkpoint is on disk
            seen.append(line)
            if line.startswith("step ") and int(line.split()[1]) > every:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert not (out / "metrics.json").exists()  # killed mid-run
    at = torch.load(out / "checkpoint" / "fit.pt", weights_only=True)["step"]
    assert every <= at < steps and at % every == 0, at

    code, stdout, stderr = run_main(capsys, *common, "--out", out, "--resume")
    assert code == 0, stderr
    resumed = _logged_losses(stdout)
    assert sorted(resumed) == list(range(at + 1, steps + 1))  # went on from the checkpoint's step, not step 1
    code, full_stdout, _ = run_main(capsys, *common, "--out", tmp_path / "full")  # never interrupted
    assert code == 0
    full = _logged_losses(full_stdout)
    assert {s: full[s] for s in resumed} == resumed  # the same curve from the checkpoint on
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "full"))
    assert a["fit/loss"] == b["fit/loss"] and a["eval/mse"] == b["eval/mse"] and a["fit/steps"] == steps

    # --resume once more: the finished checkpoint is reused, nothing is fitted again
    code, stdout, stderr = run_main(capsys, *common, "--out", out, "--resume")
    assert code == 0, stderr
    assert "step " not in stdout  # nothing left to run: the finished checkpoint was reused
    assert json.loads((out / "metrics.json").read_text())["fit/loss"] == a["fit/loss"]


def test_precision_and_compile_flags(speech_wav, tmp_path, capsys, monkeypatch):
    """--precision bf16 and --compile reach the fit (dynamo's "eager" backend: the real tracing, no C++ build)."""
    import torch

    import fewsound.fit

    calls = []
    real_compile = torch.compile

    def eager_backend_compile(fn, **kwargs):
        calls.append(kwargs.get("mode"))
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_backend_compile)
    monkeypatch.setattr(fewsound.fit, "_COMPILED", {})  # compiled forwards are shared per process: start afresh
    common = [speech_wav, "--inr", "kan", "--steps", "3", "--length", "4096", "--metrics", "mse", "--log-every", "3"]
    code, _, stderr = run_main(capsys, *common, "--out", tmp_path / "a", "--precision", "bf16", "--compile")
    assert code == 0 and "torch.compile failed" not in stderr, stderr
    assert calls == [None]  # --compile alone: torch.compile's default mode
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["config"]["precision"] == "bf16" and metrics["config"]["compile"] == "default"
    assert run_main(capsys, *common, "--out", tmp_path / "b")[0] == 0
    full = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["fit_key"] != full["fit_key"]  # bf16 computes another fit; compiling does not change the key
    assert metrics["fit/loss"] == pytest.approx(full["fit/loss"], rel=0.05) and metrics["fit/loss"] != full["fit/loss"]


@pytest.mark.parametrize(
    "make, args, message",
    [
        (None, [], "no such file"),
        ("garbage", [], "unreadable audio"),
        ("silent", ["--length", "0"], "silent"),
        ("short", [], "too short"),
        ("short", ["--length", "0"], "too short"),
        ("speech", ["--inr", "transformer"], "unknown INR family"),
        ("speech", ["--set", "grid=3"], "kan.grid"),
        ("speech", ["--metrics", "psnr,bogus"], "bogus"),
        ("speech", ["--precision", "fp8"], "precision"),
        ("speech", ["--compile", "fastest"], "compile"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, speech_wav, capsys, make, args, message):
    path = tmp_path / "clip.wav"
    if make == "garbage":
        path.write_bytes(b"this is not audio" * 100)
    elif make == "silent":
        sf.write(path, np.zeros(8000, np.float32), SR)
    elif make == "short":
        sf.write(path, 0.5 * np.sin(np.arange(900) / 5.0).astype(np.float32), SR)
    elif make == "speech":
        path = speech_wav
    code, _, stderr = run_main(capsys, path, "--steps", "1", "--out", tmp_path / "out", *args)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_bad_input_exit_code_from_a_real_process(tmp_path, run_cli):
    proc = run_cli(tmp_path / "missing.wav", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.wav'}: no such file"]
