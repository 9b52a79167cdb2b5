"""The listening page of a real smoke sweep (real Ray, real MLflow server), downloaded from its parent run and
opened in a real headless Chromium: every <audio> loads with the clip's duration and decodes to its samples,
every <img> decodes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser import Chromium

LENGTH, SR = 16_384, 22_050

# Waits for each audio element's metadata (or error), decodes its data with Web Audio at the clip's rate, and
# reads every image's decoded size; the page itself has no script.
CHECK_JS = """
(async () => {
  const audios = [...document.querySelectorAll('audio')];
  const media = await Promise.all(audios.map(a => new Promise(resolve => {
    const done = () => resolve({duration: a.duration, error: a.error ? a.error.code : null});
    if (a.readyState >= 1 || a.error) return done();
    a.addEventListener('loadedmetadata', done);
    a.addEventListener('error', done);
    setTimeout(done, 30000);
  })));
  for (const [i, a] of audios.entries()) {
    const data = await (await fetch(a.src)).arrayBuffer();
    const ctx = new OfflineAudioContext(1, 1, %(sr)d);
    try { media[i].samples = (await ctx.decodeAudioData(data)).length; } catch (e) { media[i].samples = String(e); }
    media[i].row = a.closest('tr').dataset.label || 'target';
    media[i].section = a.closest('section').id;
  }
  await Promise.all([...document.images].map(im => im.decode().catch(() => null)));
  const images = [...document.images].map(im => ({width: im.naturalWidth, height: im.naturalHeight}));
  return {media, images, sections: [...document.querySelectorAll('section.clip')].map(s => s.id)};
})()
""" % {"sr": SR}


@pytest.mark.system
def test_smoke_sweeps_listening_page_plays_in_chromium(home, tmp_path):
    from mlflow.tracking import MlflowClient

    from fewsound import listen
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask
    from tune.jobs import corpus_clips, resolve_corpus
    from tune.report import LISTEN_ARTIFACT
    from tune.sweep import run_sweep

    corpus = resolve_corpus(None, LENGTH)
    clips = corpus_clips(corpus, "2", "speech")
    tasks = [
        FitTask(FitConfig(family=f, steps=2), c.clip_id, c.kind, LENGTH, f.upper())
        for f in ("kan", "nerf")
        for c in clips
    ]
    s = run_sweep(
        "fit_inrs",
        tasks,
        corpus=corpus,
        experiment="listen-e2e",
        progress=False,
        metrics=("mse", "psnr", "lsd", "si_snr"),
        table={"title": "smoke", "label_order": ["NERF", "KAN"]},
    )
    assert s.failed == 0 and len(s.rows) == 4

    # the parent run carries the page
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    logged = [f.path for f in client.list_artifacts(s.parent_run_id, "report")]
    assert logged == [LISTEN_ARTIFACT]
    page = Path(client.download_artifacts(s.parent_run_id, LISTEN_ARTIFACT, str(tmp_path)))
    assert 50_000 < page.stat().st_size < 2_000_000

    with Chromium() as browser:
        result = browser.evaluate(page.resolve().as_uri(), CHECK_JS)

    assert result["sections"] == [f"clip-{c.clip_id}-{LENGTH}" for c in clips]
    media = result["media"]
    assert [m["row"] for m in media] == ["target", "NERF", "KAN"] * 2  # the paper's order, not the fitting order
    for m in media:
        assert m["error"] is None, m
        assert m["duration"] == pytest.approx(LENGTH / SR, abs=2e-3), m
        assert m["samples"] == LENGTH, m
    images = result["images"]
    assert len(images) == 2 * (1 + 2 * 2)  # per clip: the target's spectrogram, each fit's prediction and difference
    assert all(im == {"width": LENGTH // 256 + 1, "height": listen.IMAGE_ROWS} for im in images), images

    # the address the job prints opens MLflow's UI on the sweep's runs (its model-training layout), not on the
    # GenAI overview of traces it shows an experiment by default
    assert s.ui_url.endswith(f"/#/experiments/{s.experiment_id}?workflowType=machine_learning")
    text_js = (
        "new Promise(r => { const t0 = Date.now(); const poll = () => { const t = document.body.innerText; "
        "if (/[1-9][0-9]* matching runs/.test(t) || Date.now() - t0 > 40000) r(t); else setTimeout(poll, 250); }; "
        "poll(); })"
    )
    with Chromium() as browser:
        text = browser.evaluate(s.ui_url, text_js)
    assert "listen-e2e" in text and "Run Name" in text and "5 matching runs" in text, text[:2000]
    assert s.sweep in text  # the parent run, named after the sweep
    assert "Token Usage" not in text and "No data available" not in text, text[:2000]
