"""`python -m fewsound evaluate` on generated files: the real command for file and folder pairs, and one-line
errors naming the file for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from fewsound.cli import main
from fewsound.data.audio import save_audio
from fewsound.metrics import METRICS

SR = 22_050


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory, speech_clips):
    """ref/ and rec/ folders with two real speech clips (1 s) and their noisy versions, same file names."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for i, clip in enumerate(speech_clips[:2]):
        x = clip.load(sr=SR)[:SR]
        save_audio(root / "ref" / f"s{i}.wav", x)
        save_audio(root / "rec" / f"s{i}.wav", x + 0.01 * rng.standard_normal(len(x)).astype(np.float32))
    return root / "ref", root / "rec"


@pytest.fixture
def run_cli(processes):
    """`python -m fewsound evaluate ...` as a process (tests/conftest.py's `processes`)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return processes.run([sys.executable, "-m", "fewsound", "evaluate", *map(str, args)], timeout=300)

    return run


def test_file_pair_prints_every_metric_as_json(pair_dirs, run_cli):
    ref, rec = pair_dirs
    out = run_cli(ref / "s0.wav", rec / "s0.wav", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)["s0.wav"]
    assert set(result) == set(METRICS) | {"not_applicable"} and result["not_applicable"] == {}
    assert 1.0 < result["pesq"] < 4.7 and 0 < result["stoi"] <= 1 and result["cdpam"] > 0 and result["mse"] > 0
    # PESQ and STOI as the packages compute them on the same files (read with soundfile; PESQ at 16 kHz after
    # librosa's kaiser_best resampling, the paper's; STOI at the file's rate)
    import librosa
    from pesq import pesq
    from pystoi import stoi

    x, sr = sf.read(str(ref / "s0.wav"), dtype="float32")
    y, _ = sf.read(str(rec / "s0.wav"), dtype="float32")
    assert sr == SR
    x16, y16 = (librosa.resample(a, orig_sr=SR, target_sr=16_000, res_type="kaiser_best") for a in (x, y))
    assert result["pesq"] == pytest.approx(pesq(16_000, x16, y16, "wb"), abs=1e-9)
    assert result["stoi"] == pytest.approx(stoi(x, y, SR, extended=False), abs=1e-9)
    assert result["mse"] == pytest.approx(float(np.mean((x.astype(np.float64) - y) ** 2)), rel=1e-5)


def test_folder_pair_and_kind(pair_dirs, run_cli):
    ref, rec = pair_dirs
    out = run_cli(ref, rec, "--kind", "music", "--metrics", "mse", "psnr", "pesq")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert sorted(result) == ["s0.wav", "s1.wav"]
    for row in result.values():
        assert set(row) == {"mse", "psnr", "not_applicable"} and "music" in row["not_applicable"]["pesq"]


def test_identical_files_give_strict_json_inf(pair_dirs, capsys):
    ref, _ = pair_dirs
    assert main(["evaluate", str(ref / "s0.wav"), str(ref / "s0.wav"), "--metrics", "mse", "psnr", "si_snr"]) == 0
    row = json.loads(capsys.readouterr().out)["s0.wav"]  # json.loads accepts strict JSON only here: no Infinity
    assert row["mse"] == 0 and row["psnr"] == "inf" and row["si_snr"] == "inf"


def _error_line(capsys, argv) -> str:
    assert main(["evaluate", *map(str, argv), "--metrics", "mse"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_inputs_name_the_file(pair_dirs, tmp_path, capsys):
    ref, rec = pair_dirs
    short = save_audio(tmp_path / "short.wav", np.full(SR - 10, 0.1, np.float32))
    assert "short.wav" in (e := _error_line(capsys, [ref / "s0.wav", short])) and "length" in e
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all")
    assert "junk.wav" in (e := _error_line(capsys, [ref / "s0.wav", junk])) and "unreadable" in e
    nan = tmp_path / "nan.wav"
    x = sf.read(str(ref / "s0.wav"), dtype="float32")[0]
    x[5] = np.nan
    sf.write(str(nan), x, SR, subtype="FLOAT")
    assert "nan.wav" in (e := _error_line(capsys, [ref / "s0.wav", nan])) and "NaN" in e
    partial = tmp_path / "partial"
    save_audio(partial / "s0.wav", sf.read(str(rec / "s0.wav"), dtype="float32")[0])
    assert "s1.wav" in (e := _error_line(capsys, [ref, partial])) and "missing" in e
    assert "silent" in _error_line(
        capsys, [save_audio(tmp_path / "zero.wav", np.zeros(SR, np.float32)), ref / "s0.wav"]
    )
