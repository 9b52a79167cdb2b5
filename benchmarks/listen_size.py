"""Size of the listening page (fewsound.listen) for the README's main command and for a 1,000-fit sweep.

    python benchmarks/listen_size.py --steps 20 --clips 2

Fits every INR family on `--clips` 1.5 s speech clips of the built-in corpus (as `jobs/fit_inrs.py --clips 2
--lengths 1.5` does, in one process, without Ray or MLflow), renders the page with the default clip sample and
reports its size and the bytes per shown fit and per target. A 1,000-fit sweep's page shows a bounded sample:
the script counts the fits and targets the default sample shows for a 1,008-fit Table 1 sweep (84 clips x 6
families x 2 lengths) and for a 988-fit KAN ablation (38 clips x 26 configurations, 1.5 s) and sizes them with
the measured bytes (a 3 s fit counted as twice a 1.5 s one: its audio and images have twice the frames).
Results: benchmarks/results/listen_size.json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "listen_size.json"


def fit_rows(n_clips: int, steps: int, length: int = 32_768):
    from fewsound import listen
    from fewsound.data.builtin import builtin_corpus
    from fewsound.fit import FitConfig, fit
    from fewsound.inr import FAMILIES
    from fewsound.metrics import evaluate, to_mlflow

    clips = builtin_corpus("speech")[:n_clips]
    targets = np.stack([c.load()[:length] for c in clips])
    rows, preds = [], {}
    for family in FAMILIES:
        results = fit(FitConfig(family=family, steps=steps), targets)
        scores = evaluate(targets, np.stack([r.reconstruction for r in results]), 22_050, kind="speech")
        for clip, r, m in zip(clips, results, scores):
            run_id = f"{family}-{clip.clip_id}"
            rows.append(
                {"label": family.upper(), "clip_id": clip.clip_id, "length": length, "run_id": run_id, **to_mlflow(m)}
            )
            preds[run_id] = r.reconstruction
    audio = {
        (c.clip_id, length): listen.ClipAudio(
            targets[i], {r["run_id"]: preds[r["run_id"]] for r in rows if r["clip_id"] == c.clip_id}, 22_050
        )
        for i, c in enumerate(clips)
    }
    return rows, audio


def shown(rows: list[dict]) -> tuple[int, int]:
    """(fit-seconds shown, target-seconds shown) by the default sample of `rows`, in units of 1.5 s."""
    from fewsound import listen

    sections = listen.sample_sections(rows)
    return sum(len(s.rows) * s.length // 32_768 for s in sections), sum(s.length // 32_768 for s in sections)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clips", type=int, default=2)
    args = p.parse_args()
    from fewsound import listen, tables

    rows, audio = fit_rows(args.clips, args.steps)
    order = [r["label"] for r in rows[:: args.clips]]
    summary = [tables.build_table(rows, title="Table 1", paper_table=1, label_order=order)]
    header = {"command": f"jobs/fit_inrs.py --steps {args.steps} --clips {args.clips} --lengths 1.5"}
    page = listen.render_page(
        listen.sample_sections(rows, None, order), audio, title="fit_inrs: listen", header=header, summary=summary
    )
    size = len(page.encode())
    fit_bytes = [len(m) for m in re.findall(r'<tr class="fit".*?</tr>', page, re.S)]
    target_bytes = [len(m) for m in re.findall(r'<tr class="target".*?</tr>', page, re.S)]
    per_fit, per_target = float(np.mean(fit_bytes)), float(np.mean(target_bytes))
    rest = size - sum(fit_bytes) - sum(target_bytes)

    table1 = [
        {"label": f, "clip_id": f"c{c}", "length": n} for n in (32_768, 65_536) for f in "abcdef" for c in range(84)
    ]
    ablation = [{"label": f"k{k}", "clip_id": f"c{c}", "length": 32_768} for k in range(26) for c in range(38)]
    out = {
        "command": header["command"],
        "fits": len(rows),
        "page_bytes": size,
        "bytes_per_fit_1_5s": per_fit,
        "bytes_per_target_1_5s": per_target,
    }
    for name, big in (("table1_1008_fits", table1), ("ablation_988_fits", ablation)):
        fits_15, targets_15 = shown(big)
        out[name] = {
            "fits_shown_in_1_5s_units": fits_15,
            "targets_shown_in_1_5s_units": targets_15,
            "estimated_page_bytes": round(fits_15 * per_fit + targets_15 * per_target + rest),
        }
    print(json.dumps(out, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
