"""A sweep driver for test_durable.py, run as its own process as a job's driver is: tiny NeRF fits of the built-in
corpus through run_sweep, the jobs' one-line error handling and summary, then `RESULT <json>`.

    python tests/durable_driver.py EXPERIMENT FITS STEPS TRIALS_PER_SLOT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(experiment: str, fits: int, steps: int, trials_per_slot: int) -> int:
    from fewsound.errors import FewsoundError
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask
    from tune.jobs import corpus_clips, print_summary, resolve_corpus
    from tune.sweep import run_sweep

    try:
        corpus = resolve_corpus(None, 4096)
        clips = corpus_clips(corpus, str(fits), "all")
        tasks = [FitTask(FitConfig(family="nerf", steps=steps), c.clip_id, c.kind, 4096, "nerf") for c in clips]
        s = run_sweep(
            "durable",
            tasks,
            corpus=corpus,
            experiment=experiment,
            pack_size=1,
            trials_per_slot=trials_per_slot,
            num_cpus=2,
            metrics=("mse", "psnr"),
            listen_clips=0,
        )
    except FewsoundError as e:  # as every job does: one line, non-zero exit
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(s)
    packs = [{k: p.get(k) for k in ("trial", "pack", "pid", "fits_done", "fits_skipped", "fits_kept")} for p in s.packs]
    print("RESULT " + json.dumps({"done": s.done, "skipped": s.skipped, "failed": s.failed, "packs": packs}))
    return 0 if s.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], *map(int, sys.argv[2:5])))
