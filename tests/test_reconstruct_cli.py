"""`python -m fewsound reconstruct MODEL IN OUT`: a real round trip on built-in speech, and one-line errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import soundfile as sf

from fewsound.cli import main
from fewsound.data.audio import save_audio
from fewsound.hyper import HyperConfig, build_model, load_model, reconstruct_long, save_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model = build_model(HyperConfig(preset="tiny", target="kan"), verbose=False)
    return save_model(tmp_path_factory.mktemp("model") / "fewsound-tiny.pt", model)


def test_round_trip_on_a_long_speech_file(tmp_path, model_path, speech_clips, processes):
    clip = speech_clips[0]
    x = clip.load(sr=None)  # the file's own rate (not the model's): the command resamples
    inp = tmp_path / "in.flac"
    save_audio(inp, x, sr=clip.sample_rate)
    out = tmp_path / "out.wav"
    proc = processes.run(
        [sys.executable, "-m", "fewsound", "reconstruct", str(model_path), str(inp), str(out), "--batch-size", "4"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    y, sr = sf.read(out, dtype="float32")
    expected = clip.load()  # the same clip at the model's 22,050 Hz
    assert sr == 22_050 and y.shape == expected.shape and len(y) > 3 * 4096
    assert np.isfinite(y).all() and np.abs(y).max() > 0
    # the command's output is the library's windowed reconstruction of the resampled file
    ref = reconstruct_long(load_model(model_path), expected, batch_size=4).numpy()
    np.testing.assert_allclose(y, ref, atol=1e-5)
    assert "samples at 22050 Hz" in proc.stderr


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(["reconstruct", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_bad_inputs_give_one_line_errors(tmp_path, model_path, capsys):
    wav = tmp_path / "in.wav"
    save_audio(wav, np.sin(np.arange(5000) / 7).astype(np.float32))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 22_050)
    cases = [
        ((tmp_path / "missing.pt", wav, tmp_path / "o1.wav"), "no such model file"),
        ((junk, wav, tmp_path / "o2.wav"), "not a readable fewsound model"),
        ((wav, wav, tmp_path / "o3.wav"), "not a readable fewsound model"),
        ((model_path, tmp_path / "missing.wav", tmp_path / "o4.wav"), "missing.wav"),
        ((model_path, model_path, tmp_path / "o5.wav"), "fewsound-tiny.pt"),
        ((model_path, empty, tmp_path / "o6.wav"), "empty.wav"),
        ((model_path, wav, tmp_path / "o7.wav", "--overlap", "4096"), "--overlap"),
        ((model_path, wav, tmp_path / "o8.wav", "--device", "nonsense"), "nonsense"),
    ]
    for argv, needle in cases:
        rc, err = _run(capsys, *argv)
        assert rc == 2, (argv, err)
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
        assert not argv[2].exists()
    rc, err = _run(capsys, model_path, wav, tmp_path / "ok.wav", "--overlap", "0")
    assert rc == 0 and sf.info(tmp_path / "ok.wav").frames == 5000
