"""fewsound.listen: the listening page's structure, built from real fits of real clips (no Ray, no MLflow): one
section per sampled clip and length in the paper's order, one audio per row that decodes to the fit's samples,
spectrogram images that decode, the best value of each metric column marked, the paper's numbers in the header,
nothing linked from outside the page."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from fewsound import listen, tables

LENGTH, STEPS, FAMILIES = 4096, 4, ("kan", "nerf")  # tiny real fits: seconds on a CPU
ORDER = ["NERF", "KAN"]  # the paper's order (Table 1), not the fitting order


class Page(HTMLParser):
    """The page as a flat list of (tag, attrs, enclosing section id, enclosing row attrs), plus the text."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict, str | None, dict | None]] = []
        self.section: str | None = None
        self.row: dict | None = None
        self.text = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs.get("id")
        if tag == "tr":
            self.row = attrs
        self.elements.append((tag, attrs, self.section, self.row))

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None
        if tag == "tr":
            self.row = None

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, section: str | None = None, **attrs) -> list[tuple[dict, dict | None]]:
        return [
            (a, row)
            for t, a, s, row in self.elements
            if t == tag and (section is None or s == section) and all(a.get(k) == v for k, v in attrs.items())
        ]


def decode(uri: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert uri.startswith(prefix), uri[:40]
    return base64.b64decode(uri[len(prefix) :])


@pytest.fixture(scope="module")
def fits(speech_clips):
    """Two families fitted on two real speech clips: rows as the sweeps collect them, and the audio."""
    from fewsound.fit import FitConfig, fit
    from fewsound.metrics import evaluate, to_mlflow

    clips = speech_clips[:2]
    targets = np.stack([c.load()[:LENGTH] for c in clips])
    rows, preds = [], {}
    for family in FAMILIES:
        results = fit(FitConfig(family=family, steps=STEPS), targets)
        recs = np.stack([r.reconstruction for r in results])
        scores = evaluate(targets, recs, 22_050, metrics=["mse", "psnr", "lsd", "si_snr"])
        for clip, result, m in zip(clips, results, scores):
            run_id = f"run-{family}-{clip.clip_id}"
            rows.append(
                {
                    "label": family.upper(),
                    "family": family,
                    "clip_id": clip.clip_id,
                    "length": LENGTH,
                    "kind": "speech",
                    "run_id": run_id,
                    "model/params": float(result.num_params),
                    **to_mlflow(m),
                }
            )
            preds[run_id] = result.reconstruction
    audio = {
        (c.clip_id, LENGTH): listen.ClipAudio(
            targets[i], {r["run_id"]: preds[r["run_id"]] for r in rows if r["clip_id"] == c.clip_id}, 22_050
        )
        for i, c in enumerate(clips)
    }
    return rows, audio, [c.clip_id for c in clips]


def test_page_has_a_section_per_clip_an_audio_per_row_and_the_best_marked(fits):
    rows, audio, clip_ids = fits
    sections = listen.sample_sections(rows, 4, ORDER)
    header = {"command": "jobs/fit_inrs.py --steps 4", "steps": STEPS, "commit": "0123abc"}
    text = listen.render_page(sections, audio, title="fit_inrs: listen", header=header, n_clips_total=2)
    page = Page(text)

    # every source is embedded: no link that a download would break
    srcs = [a["src"] for t, a, _, _ in page.elements if "src" in a] + [
        a["href"] for t, a, _, _ in page.elements if "href" in a
    ]
    assert srcs and all(s.startswith(("data:", "#")) for s in srcs), [s[:30] for s in srcs if not s.startswith("data:")]
    assert not page.find("script")
    body = "".join(page.text)
    assert "jobs/fit_inrs.py --steps 4" in body and "0123abc" in body

    # one section per clip, in the sweep's (corpus) order
    ids = [a["id"] for a, _ in page.find("section")]
    assert ids == [f"clip-{c}-{LENGTH}" for c in clip_ids]
    for section_id, clip in zip(ids, clip_ids):
        target = page.find("tr", section_id, **{"class": "target"})
        fit_rows = page.find("tr", section_id, **{"class": "fit"})
        assert len(target) == 1
        assert [a["data-label"] for a, _ in fit_rows] == ORDER  # the paper's row order, not the fitting order
        audios = page.find("audio", section_id)
        assert len(audios) == 1 + len(ORDER)  # the target and one per row
        assert [row.get("data-label") for _, row in audios[1:]] == ORDER

        # each row's audio is its own fit, as 16-bit FLAC of the whole crop
        import soundfile as sf

        for a, row in audios[1:]:
            x, sr = sf.read(io.BytesIO(decode(a["src"], "audio/flac")), dtype="float32")
            assert sr == 22_050 and x.shape == (LENGTH,)
            pred = audio[(clip, LENGTH)].preds[row["data-run-id"]]
            assert np.abs(x - np.clip(pred, -1, 1)).max() <= 1.0 / 32_768 + 1e-7
        x, _ = sf.read(io.BytesIO(decode(audios[0][0]["src"], "audio/flac")), dtype="float32")
        assert np.abs(x - audio[(clip, LENGTH)].target).max() <= 1.0 / 32_768 + 1e-7

        # target spectrogram once, then prediction and difference per row: PNGs of the crop's frames
        from PIL import Image

        images = page.find("img", section_id)
        assert len(images) == 1 + 2 * len(ORDER)
        for a, _ in images:
            im = Image.open(io.BytesIO(decode(a["src"], "image/png")))
            assert im.size == (LENGTH // 256 + 1, listen.IMAGE_ROWS)

        # the best value of each metric column is marked, once, on the right row
        section_rows = {r["run_id"]: r for r in rows if r["clip_id"] == clip}
        measured = [c for c, key, _ in tables.COLUMNS if all(key in r for r in section_rows.values())]
        assert measured == ["MSE", "PSNR", "LSD", "SI-SNR"]  # the metrics the fixture computed
        for column, key, better in tables.COLUMNS:
            cells = page.find("td", section_id, **{"data-column": column})
            if column not in measured:  # a metric no fit has: no column for it
                assert not cells, column
                continue
            assert len(cells) == len(ORDER), column  # a measured column is on the page, a cell per row
            best = [row["data-run-id"] for a, row in cells if "best" in a["class"].split()]
            values = {rid: r[key] for rid, r in section_rows.items()}
            expect = (min if better == "lower" else max)(values, key=values.get)
            assert best == [expect], (column, values)


def test_sampling_spreads_clips_and_bounds_the_page(fits):
    rows, _, _ = fits
    one_clip = [r for r in rows if r["clip_id"] == rows[0]["clip_id"]]  # a row per family
    many = [dict(r, clip_id=f"c{i:03d}", run_id=f"{r['run_id']}-{i}") for i in range(40) for r in one_clip]
    sections = listen.sample_sections(many, 3, ORDER)
    assert [s.clip_id for s in sections] == ["c000", "c020", "c039"]  # first, middle, last
    assert all([r["label"] for r in s.rows] == ORDER for s in sections)
    # a clip fitted at two lengths: a section per length, the shorter first
    both = [dict(r, length=2 * LENGTH, run_id=r["run_id"] + "-long") for r in rows] + rows
    sections = listen.sample_sections(both, 1, ORDER)
    clip = rows[0]["clip_id"]
    assert [(s.clip_id, s.length) for s in sections] == [(clip, LENGTH), (clip, 2 * LENGTH)]
    assert listen.sample_sections(rows, 0) == []
    # the default: LISTEN_CLIPS clips, fewer when a clip has many fits (an ablation's 26 configurations x 2 lengths)
    table1 = [{"label": f, "clip_id": f"c{c}", "length": n} for n in (1, 2) for f in "abcdef" for c in range(84)]
    ablation = [
        {"label": f"k{k}", "clip_id": f"c{c}", "length": n} for n in (1, 2) for k in range(26) for c in range(9)
    ]
    assert len({s.clip_id for s in listen.sample_sections(table1)}) == listen.LISTEN_CLIPS == 4
    assert len({s.clip_id for s in listen.sample_sections(ablation)}) == 1
    assert sum(len(s.rows) for s in listen.sample_sections(ablation)) <= listen.LISTEN_MAX_FITS


def test_header_shows_the_papers_numbers_and_sections_without_audio_show_metrics(fits):
    rows, _, _ = fits
    # the same fits presented as 1.5 s crops: Table 1's numbers appear beside ours in the header's table
    table_rows = [dict(r, length=32_768) for r in rows]
    summary = tables.build_table(table_rows, title="Table 1", paper_table=1, label_order=ORDER)
    sections = listen.sample_sections(table_rows, 1, ORDER)
    page = Page(listen.render_page(sections, {}, title="t", header={}, summary=[summary]))
    paper_kan_psnr = tables.paper_values(1, "KAN", 1.5)["PSNR"][0]
    cells = page.find("td", None, **{"data-column": "PSNR"})
    kan = [a for a, row in cells if row.get("data-label") == "KAN"]
    assert kan and f"{paper_kan_psnr:.2f}" in "".join(page.text)
    assert not page.find("audio") and "no audio logged" in "".join(page.text)
    assert len(page.find("tr", None, **{"class": "fit"})) == len(ORDER)


def test_images_share_the_targets_colour_scale(fits):
    rows, audio, clip_ids = fits
    a = audio[(clip_ids[0], LENGTH)]
    from PIL import Image

    vmax = float(listen.magnitude_db(a.target).max())
    target = np.asarray(Image.open(io.BytesIO(listen.spectrogram_png(a.target, vmax))))
    quieter = np.asarray(Image.open(io.BytesIO(listen.spectrogram_png(a.target * 0.1, vmax))))
    # on one scale a signal 20 dB down is darker everywhere it is above the floor (palette index = level)
    assert target.max() == 255 and quieter.max() < target.max()
    assert re.fullmatch(
        r"data:image/png;base64,[A-Za-z0-9+/=]+", listen.png_data_uri(listen.spectrogram_png(a.target, vmax))
    )
