#!/usr/bin/env python
"""Rebuild the built-in corpus (fewsound/data/builtin/) from installed Debian packages.

Sources (all from Debian's own archive, nothing downloaded from anywhere else):
- real recorded speech: the Asterisk voice prompts `asterisk-core-sounds-{en,es,fr,it,ru}-g722`
  (16 kHz G.722, decoded with the PyPI package `g722`; CC-BY-SA-3.0 / CC-BY-3.0);
- music: the CC0 loops of `sonic-pi-samples` and two excerpts of `asterisk-moh-opsound-g722` (CC-BY-SA-3.0);
- environmental sound: CC0 one-shots/ambiences of `sonic-pi-samples`.

First install the packages (as root):

    apt-get update && apt-get install -y --no-install-recommends \
        asterisk-core-sounds-en-g722 asterisk-core-sounds-es-g722 asterisk-core-sounds-fr-g722 \
        asterisk-core-sounds-it-g722 asterisk-core-sounds-ru-g722 asterisk-moh-opsound-g722 sonic-pi-samples

then run `python scripts/build_builtin_corpus.py` (or pass `--apt` to let it run that command itself).

Every choice is deterministic: speech prompts are the top-level prompts of a voice whose trimmed length lies in
[SPEECH_MIN_S, SPEECH_MAX_S] with no internal pause longer than MAX_GAP_S, taken at evenly spaced positions of the
name-sorted candidate list; music/environment clips are a fixed list of files. Each clip is mono, trimmed of
leading/trailing silence (20 ms frames below -40 dB re. the clip's peak frame), peak-normalised to PEAK and written
as 16-bit FLAC: speech at its native 16 kHz (G.722 carries nothing above 7 kHz), sonic-pi at 22,050 Hz, the
16 kHz music-on-hold excerpts at 16 kHz. No clip is a concatenation: every voice has enough single prompts of at
least 3.6 s, the length the paper's FewSound split needs (0.5 s skipped + 65,536 samples at 22,050 Hz).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "fewsound" / "data" / "builtin"
ASTERISK = Path("/usr/share/asterisk")
SONIC_PI = Path("/usr/share/sonic-pi/samples")

FRAME_S = 0.02  # energy frame for silence detection
SILENCE_DB = -40.0  # a frame is "sound" when its energy is within 40 dB of the loudest frame
PAD_S = 0.05  # keep this much around the first/last sound frame so onsets/decays are not clipped
PEAK = 0.98  # peak after normalisation (leaves headroom for 16-bit rounding)
SPEECH_MIN_S, SPEECH_MAX_S, MAX_GAP_S = 3.6, 6.0, 0.6
OTHER_MAX_S = 5.0  # music/environment clips are cut to at most this (keeps the corpus a few MB)
MUSIC_SR = 22_050
# librosa 0.9's `kaiser_best` (resampy) expressed as torchaudio settings, the paper's resampler. Pinned here rather
# than imported from fewsound.data.audio so that the corpus (and its checksums) does not change with library edits.
KAISER_BEST = dict(
    lowpass_filter_width=64, rolloff=0.9475937167399596, resampling_method="sinc_interp_kaiser", beta=14.769656459379492
)


@dataclasses.dataclass(frozen=True)
class Voice:
    speaker: str
    package: str
    folder: str  # under /usr/share/asterisk/sounds
    language: str
    gender: str  # from the folder name (e.g. it_IT_m_Carlo) and the credits in the copyright file
    talent: str
    licence: str
    copyright: str
    n_clips: int


VOICES = [
    Voice(
        "en-allison",
        "asterisk-core-sounds-en-g722",
        "en_US_f_Allison",
        "en-US",
        "female",
        "Allison Smith",
        "CC-BY-SA-3.0",
        "2003-2010 Allison Smith",
        5,
    ),
    Voice(
        "es-allison",
        "asterisk-core-sounds-es-g722",
        "es_MX_f_Allison",
        "es-MX",
        "female",
        "Allison Smith",
        "CC-BY-SA-3.0",
        "2003-2010 Allison Smith",
        3,
    ),
    Voice(
        "fr-june",
        "asterisk-core-sounds-fr-g722",
        "fr_CA_f_June",
        "fr-CA",
        "female",
        "June Wallack",
        "CC-BY-SA-3.0",
        "2006-2008 June Wallack",
        5,
    ),
    Voice(
        "it-carlo",
        "asterisk-core-sounds-it-g722",
        "it_IT_m_Carlo",
        "it-IT",
        "male",
        "Carlo Flora",
        "CC-BY-3.0",
        "2012 Carlo Flora",
        8,
    ),
    Voice(
        "ru-ivrvoice",
        "asterisk-core-sounds-ru-g722",
        "ru_RU_f_IvrvoiceRU",
        "ru-RU",
        "female",
        "ivrvoice.ru voice talent (unnamed; provided by Maxim Topal)",
        "CC-BY-3.0",
        "2010 Maxim Topal (http://www.ivrvoice.ru)",
        5,
    ),
]

# sonic-pi files whose copyright stanza says CC0 (checked again at build time); (file stem, kind)
SONIC_PI_CLIPS = [
    ("guit_e_fifths", "music"),
    ("guit_em9", "music"),
    ("loop_amen_full", "music"),
    ("loop_garzul", "music"),
    ("loop_mika", "music"),
    ("loop_safari", "music"),
    ("loop_tabla", "music"),
    ("ambi_dark_woosh", "environment"),
    ("ambi_glass_hum", "environment"),
    ("ambi_glass_rub", "environment"),
    ("misc_cineboom", "environment"),
    ("perc_bell", "environment"),
    ("vinyl_hiss", "environment"),
]
# music-on-hold tracks: (file stem, artist id, start second of the excerpt)
MOH_CLIPS = [("macroform-cold_day", "macroform", 30.0), ("manolo_camp-morning_coffee", "manolo-camp", 30.0)]
MOH_PACKAGE = "asterisk-moh-opsound-g722"
SONIC_PI_PACKAGE = "sonic-pi-samples"
PACKAGES = [v.package for v in VOICES] + [MOH_PACKAGE, SONIC_PI_PACKAGE]


# ---------------------------------------------------------------- helpers


def package_version(pkg: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout:
        sys.exit(f"{pkg} is not installed; run: apt-get install -y --no-install-recommends {' '.join(PACKAGES)}")
    return out.stdout.strip()


def resample(x: np.ndarray, orig_sr: int, sr: int) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    y = AF.resample(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), orig_sr, sr, **KAISER_BEST)
    return y.numpy().astype(np.float32)


def decode_g722(path: Path) -> np.ndarray:
    """G.722 at 64 kbit/s -> float32 [N] at 16 kHz (a fresh decoder per file: each prompt starts from reset)."""
    import G722  # the PyPI package `g722`

    pcm = np.asarray(G722.G722(16_000, 64_000).decode(path.read_bytes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


def frame_db(x: np.ndarray, sr: int) -> np.ndarray:
    """Energy of each 20 ms frame in dB relative to the loudest frame: [n_frames]."""
    n = int(round(FRAME_S * sr))
    m = len(x) // n
    e = (x[: m * n].astype(np.float64).reshape(m, n) ** 2).mean(axis=1)
    return 10 * np.log10(e + 1e-20) - 10 * np.log10(e.max() + 1e-20)


def trim(x: np.ndarray, sr: int) -> tuple[np.ndarray, float]:
    """Cut leading/trailing silence (keeping PAD_S); also return the longest internal pause in seconds."""
    if len(x) < int(FRAME_S * sr) or not np.any(x):
        return x[:0], 0.0
    on = frame_db(x, sr) > SILENCE_DB
    idx = np.flatnonzero(on)
    n = int(round(FRAME_S * sr))
    pad = int(PAD_S * sr)
    a, b = max(0, idx[0] * n - pad), min(len(x), (idx[-1] + 1) * n + pad)
    gaps = np.diff(idx) - 1
    return x[a:b], float(gaps.max() * FRAME_S) if gaps.size else 0.0


def normalize(x: np.ndarray) -> np.ndarray:
    return (x * (PEAK / float(np.abs(x).max()))).astype(np.float32)


def median_f0(x: np.ndarray, sr: int) -> float:
    """Median F0 (Hz) of the voiced frames, by librosa's pYIN; the check of each voice's stated gender."""
    import librosa

    f0, voiced, _ = librosa.pyin(x, fmin=60.0, fmax=400.0, sr=sr, frame_length=1024)
    return float(np.nanmedian(f0[voiced])) if np.any(voiced) else float("nan")


def formant_dispersion(x: np.ndarray, sr: int) -> np.ndarray:
    """Per loud 25 ms frame, (F4 - F1) / 3 in Hz from LPC roots at 10 kHz: [n_frames].

    Formant spacing scales inversely with vocal-tract length (about 1.0 kHz for adult men, 1.2 kHz for
    women), a second, pitch-independent check of the stated gender.
    """
    import librosa
    from scipy.signal import lfilter

    x = lfilter([1.0, -0.63], [1.0], resample(x, sr, 10_000))  # pre-emphasis
    n, hop = 250, 100
    frames = librosa.util.frame(np.ascontiguousarray(x), frame_length=n, hop_length=hop).T
    energy = (frames**2).mean(axis=1)
    out = []
    for f in frames[energy > 0.1 * energy.max()]:
        roots = np.roots(librosa.lpc(f * np.hamming(n), order=12))
        roots = roots[(np.imag(roots) > 0) & (-10_000 / np.pi * np.log(np.abs(roots)) < 400)]  # bandwidth < 400 Hz
        freqs = np.sort(np.angle(roots) * 10_000 / (2 * np.pi))
        freqs = freqs[freqs > 200]
        if len(freqs) >= 4:
            out.append((freqs[3] - freqs[0]) / 3)
    return np.asarray(out)


def voice_summary(rows: list[dict]) -> dict:
    """Per voice: stated gender and where it comes from, and the pitch/formant evidence measured on its clips."""
    out = {}
    for v in VOICES:
        mine = [r for r in rows if r["speaker"] == v.speaker]
        disp = np.concatenate([formant_dispersion(*sf.read(str(OUT / r["path"]), dtype="float32")) for r in mine])
        out[v.speaker] = {
            "language": v.language,
            "gender": v.gender,
            "talent": v.talent,
            "package": v.package,
            "gender_source": f"package folder name '{v.folder}' and the credits in "
            f"/usr/share/doc/{v.package}/copyright",
            "n_clips": len(mine),
            "median_f0_hz": round(float(np.median([r["median_f0_hz"] for r in mine])), 1),
            "median_formant_dispersion_hz": round(float(np.median(disp)), 0),
        }
    return out


def sonic_pi_licences() -> dict[str, tuple[str, str]]:
    """etc/samples/<name>.flac -> (licence, copyright) from the package's machine-readable copyright file."""
    text = Path(f"/usr/share/doc/{SONIC_PI_PACKAGE}/copyright").read_text()
    out = {}
    for para in text.split("\n\n"):
        files = re.search(r"^Files:(.*?)^(?=\S)", para + "\nX", re.S | re.M)
        lic = re.search(r"^License: *(\S+)", para, re.M)
        cop = re.search(r"^Copyright: *(.*)", para, re.M)
        src = re.search(r"^Source: *(.*)", para, re.M)
        if files and lic:
            for f in files.group(1).split():
                out[f] = (lic.group(1), cop.group(1).strip() if cop else "", src.group(1).strip() if src else "")
    return out


def write_flac(rel: str, x: np.ndarray, sr: int) -> dict:
    path = OUT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    # soundfile/libsndfile writes bit-identical FLAC for identical samples, so rebuilds give stable checksums
    sf.write(str(path), x, sr, subtype="PCM_16", format="FLAC")
    y, _ = sf.read(str(path), dtype="float32")
    active = float((frame_db(y, sr) > SILENCE_DB).sum() * FRAME_S)
    return {
        "path": rel,
        "sample_rate": sr,
        "n_samples": int(len(y)),
        "seconds": round(len(y) / sr, 4),
        "active_seconds": round(active, 2),
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def even_pick(items: list, k: int) -> list:
    """k items at evenly spaced positions of `items` (deterministic, spread over the alphabet of prompt names)."""
    assert len(items) >= k, (len(items), k)
    return [items[round(i * (len(items) - 1) / max(k - 1, 1))] for i in range(k)]


# ---------------------------------------------------------------- builders


def build_speech(versions: dict[str, str]) -> list[dict]:
    rows = []
    for v in VOICES:
        folder = ASTERISK / "sounds" / v.folder
        cands = []
        # top-level prompts only: digits/, letters/, phonetic/ are single words and silence/ is silence
        for f in sorted(folder.glob("*.g722")):
            x, gap = trim(decode_g722(f), 16_000)
            if SPEECH_MIN_S <= len(x) / 16_000 <= SPEECH_MAX_S and gap <= MAX_GAP_S:
                cands.append((f, x))
        print(f"{v.speaker}: {len(cands)} candidate prompts", flush=True)
        for f, x in even_pick(cands, v.n_clips):
            clip_id = f"{v.speaker}_{f.stem}"
            x = normalize(x)
            row = {
                "clip_id": clip_id,
                "kind": "speech",
                "speaker": v.speaker,
                "gender": v.gender,
                "language": v.language,
                "talent": v.talent,
            }
            row |= write_flac(f"speech/{clip_id}.flac", x, 16_000)
            row |= {
                "median_f0_hz": round(median_f0(x, 16_000), 1),
                "source": {"package": v.package, "version": versions[v.package]},
                "original_files": [str(f)],
                "licence": v.licence,
                "copyright": v.copyright,
                "transform": "G.722 decoded, trimmed, peak-normalised; 16 kHz 16-bit FLAC; no concatenation",
            }
            rows.append(row)
    return rows


def build_other(versions: dict[str, str]) -> list[dict]:
    lic = sonic_pi_licences()
    rows = []
    for stem, kind in SONIC_PI_CLIPS:
        src = SONIC_PI / f"{stem}.flac"
        licence, copyright_, source_url = lic.get(f"etc/samples/{stem}.flac", ("?", "", ""))
        if licence != "CC0":
            sys.exit(f"{src}: copyright file says {licence!r}, only CC0 sonic-pi files may be shipped")
        x, sr = sf.read(str(src), dtype="float32", always_2d=True)
        x = resample(x.mean(axis=1), sr, MUSIC_SR)
        x, _ = trim(x, MUSIC_SR)
        x = normalize(x[: int(OTHER_MAX_S * MUSIC_SR)])
        author = re.sub(r"^\d{4}\s+", "", copyright_).split("<")[0].strip()
        speaker = "freesound-" + re.sub(r"[^a-z0-9]+", "-", author.lower()).strip("-")
        clip_id = f"sonic-pi_{stem}"
        row = {"clip_id": clip_id, "kind": kind, "speaker": speaker, "gender": None, "language": None}
        row |= write_flac(f"{kind}/{clip_id}.flac", x, MUSIC_SR)
        row |= {
            "source": {"package": SONIC_PI_PACKAGE, "version": versions[SONIC_PI_PACKAGE]},
            "original_files": [str(src)],
            "licence": "CC0-1.0",
            "copyright": copyright_,
            "origin_url": source_url,
            "transform": f"downmixed to mono, resampled to {MUSIC_SR} Hz, trimmed, first {OTHER_MAX_S:g} s "
            "at most, peak-normalised; 16-bit FLAC",
        }
        rows.append(row)
    for stem, artist, start in MOH_CLIPS:
        src = ASTERISK / "moh" / f"{stem}.g722"
        x = decode_g722(src)[int(start * 16_000) : int((start + OTHER_MAX_S) * 16_000)]
        x = normalize(x)
        clip_id = f"moh_{stem}"
        row = {"clip_id": clip_id, "kind": "music", "speaker": f"moh-{artist}", "gender": None, "language": None}
        row |= write_flac(f"music/{clip_id}.flac", x, 16_000)
        row |= {
            "source": {"package": MOH_PACKAGE, "version": versions[MOH_PACKAGE]},
            "original_files": [str(src)],
            "licence": "CC-BY-SA-3.0",
            "copyright": {"macroform": "2009 Paul Shuler (Macroform)", "manolo-camp": "2009 Manolo Camp"}[artist],
            "transform": f"G.722 decoded, excerpt {start:g}-{start + OTHER_MAX_S:g} s, peak-normalised; "
            "16 kHz 16-bit FLAC",
        }
        rows.append(row)
    return rows


def copyright_text(pkg: str) -> str:
    return Path(f"/usr/share/doc/{pkg}/copyright").read_text()


def write_attribution(rows: list[dict], versions: dict[str, str]) -> None:
    lines = [
        "# Built-in corpus: attribution and licences",
        "",
        'The audio in this folder was taken from Debian packages (Debian 12 "bookworm") by',
        "`scripts/build_builtin_corpus.py`, converted (decoded, trimmed, peak-normalised, resampled, cut) and",
        "stored as FLAC. Those changes are ours; the recordings belong to the people named below.",
        "`manifest.json` lists, per clip, the exact source file, package version, licence and checksum.",
        "",
        "Licences: CC-BY-SA-3.0 <https://creativecommons.org/licenses/by-sa/3.0/>,",
        "CC-BY-3.0 <https://creativecommons.org/licenses/by/3.0/>,",
        "CC0-1.0 <https://creativecommons.org/publicdomain/zero/1.0/>. Clips derived from CC-BY-SA-3.0 works",
        "(the modified files here) are distributed under CC-BY-SA-3.0 as well.",
        "",
    ]
    credits = {
        "asterisk-core-sounds-en-g722": "US English prompts recorded by Allison Smith (http://www.theivrvoice.com), "
        "(c) 2003-2010 Allison Smith; financial contributions by Digium, Inc. Licence: CC-BY-SA-3.0.",
        "asterisk-core-sounds-es-g722": "Mexican Spanish prompts recorded by Allison Smith "
        "(http://www.theivrvoice.com), (c) 2003-2010 Allison Smith; financial contributions by Digium, Inc. "
        "Licence: CC-BY-SA-3.0.",
        "asterisk-core-sounds-fr-g722": "Canadian French prompts recorded by June Wallack "
        "(http://www.junewallack.com), "
        "(c) 2006-2008 June Wallack; translated by Clod Patry, Kristopher Lalletti and June Wallack; financial "
        "contributions by Digium, Inc., Unlimitel, BGM Informatique. Licence: CC-BY-SA-3.0.",
        "asterisk-core-sounds-it-g722": "Italian prompts recorded by Carlo Flora (http://www.carloflora.com; voice "
        "available at http://www.segreterietelefoniche.it), (c) 2012 Carlo Flora; translated by Silvia Petrin from "
        "the English text distributed by Digium (http://www.digium.com). Licence: CC-BY-3.0.",
        "asterisk-core-sounds-ru-g722": "Russian prompts provided by Maxim Topal (http://www.ivrvoice.ru), (c) 2010 "
        "Maxim. Licence: CC-BY-3.0.",
        MOH_PACKAGE: 'Music on hold: "Cold Day" by Paul Shuler (Macroform), (c) 2009, '
        'http://macroform.bandcamp.com/; "Morning Coffee" by Manolo Camp, (c) 2009, '
        "http://ccmixter.org/people/ManoloCamp. Distributed under CC-BY-SA-3.0 through explicit permission "
        "from their authors.",
        SONIC_PI_PACKAGE: "Samples of Sonic Pi (https://github.com/samaaron/sonic-pi), each released under CC0 by "
        "its Freesound author (listed below). Attribution is not required for CC0; we give it anyway.",
    }
    for pkg in PACKAGES:
        used = [r for r in rows if r["source"]["package"] == pkg]
        lines += [f"## {pkg} {versions[pkg]}", "", credits[pkg], "", "Clips:"]
        for r in used:
            extra = f" - {r['copyright']}, {r.get('origin_url', '')}".rstrip(", ") if pkg == SONIC_PI_PACKAGE else ""
            lines.append(f"- `{r['path']}` from `{r['original_files'][0]}` ({r['licence']}){extra}")
        lines.append("")
    lines += [
        "## Full licence texts",
        "",
        "The complete CC-BY-SA-3.0 and CC-BY-3.0 texts are in the Debian copyright files",
        "`/usr/share/doc/asterisk-core-sounds-en-g722/copyright` (and the other packages listed above),",
        "and at the URLs given at the top of this file.",
        "",
    ]
    (OUT / "ATTRIBUTION.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--apt", action="store_true", help="run apt-get update/install for the source packages first")
    args = ap.parse_args()
    if args.apt:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], check=True)
    versions = {p: package_version(p) for p in PACKAGES}
    for sub in ("speech", "music", "environment"):
        shutil.rmtree(OUT / sub, ignore_errors=True)
    rows = build_speech(versions) + build_other(versions)
    rows.sort(key=lambda r: (r["kind"], r["clip_id"]))
    manifest = {
        "name": "fewsound-builtin",
        "description": "Real recorded speech (Asterisk voice prompts), music and environmental sound from Debian "
        "packages; see ATTRIBUTION.md.",
        "built_by": "scripts/build_builtin_corpus.py",
        "packages": versions,
        "silence_rule": {"frame_s": FRAME_S, "threshold_db_re_loudest_frame": SILENCE_DB, "pad_s": PAD_S},
        "peak": PEAK,
        "voices": voice_summary(rows),
        "clips": rows,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    write_attribution(rows, versions)
    total = sum(r["bytes"] for r in rows)
    print(f"{len(rows)} clips, {total / 1e6:.2f} MB of FLAC in {OUT}")
    for name, v in manifest["voices"].items():
        print(
            f"  {name:12s} {v['gender']:6s} F0 {v['median_f0_hz']} Hz, formant dispersion "
            f"{v['median_formant_dispersion_hz']:.0f} Hz"
        )
    for r in rows:
        f0 = f" f0={r['median_f0_hz']}" if r["kind"] == "speech" else ""
        print(f"  {r['kind']:11s} {r['clip_id']:45s} {r['seconds']:5.2f}s {r['bytes'] / 1e3:6.1f} kB{f0}")


if __name__ == "__main__":
    main()
