"""The evidence behind the INR defaults the paper leaves open: each family's default against its alternatives,
fitted the same way on the same real clip in one run.

    python benchmarks/inr_defaults.py [--steps 100] [--families siren,rff,wire,finer]

The paper gives no value (or its code's value cannot represent audio) for SIREN's hidden-layer init, RFF's
sigma, WIRE's omega_0 / omega_i / s0 and FINER's omega_0 / first-layer bias spread k. For each family this fits
the default and the alternatives that its module's docstring discusses on the first built-in speech clip at the
paper's 1.5 s length (32,768 samples at 22,050 Hz, peak-normalised), with fewsound.fit (the paper's loss, the
family's default learning rate, seed 0), and reports PSNR and SI-SNR of each. Prints a table per family and
writes benchmarks/results/inr_defaults.json; the `default` column marks the configuration the library uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# family -> [(label, INR overrides)]; the first entry is the library's default
CANDIDATES: dict[str, list[tuple[str, dict]]] = {
    "siren": [("hidden_init=siren", {}), ("hidden_init=paper_code", {"hidden_init": "paper_code"})],
    "rff": [(f"sigma={s:g}", {"sigma": float(s)}) for s in (300, 30, 100, 1000, 3000)],
    "wire": [
        ("omega_0=2000 omega_i=1 s0=0.5", {}),
        ("omega_0=2000 omega_i=20 s0=10", {"omega_i": 20.0, "s0": 10.0}),
        ("omega_0=2000 omega_i=0.5 s0=0.25", {"omega_i": 0.5, "s0": 0.25}),
        ("omega_0=500 omega_i=1 s0=0.5", {"omega_0": 500.0}),
        ("omega_0=5000 omega_i=1 s0=0.5", {"omega_0": 5000.0}),
    ],
    "finer": [
        ("omega_0=2000 k=1", {}),
        ("omega_0=2000 k=5", {"first_bias_scale": 5.0}),
        ("omega_0=500 k=5", {"omega_0": 500.0, "first_bias_scale": 5.0}),
        ("omega_0=2000 k=0.2", {"first_bias_scale": 0.2}),
    ],
}


def the_clip(length: int):
    from fewsound.data.audio import peak_normalize
    from fewsound.data.builtin import builtin_corpus

    for clip in (c for c in builtin_corpus() if c.kind == "speech"):
        x = clip.load()
        if len(x) >= length:
            return clip.clip_id, peak_normalize(x[:length], where=clip.clip_id)
    raise SystemExit(f"no built-in speech clip has {length} samples")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="fit steps per configuration (default: 100)")
    ap.add_argument("--length", type=int, default=32_768, help="clip length in samples (default: 32,768 = 1.5 s)")
    ap.add_argument("--families", default=",".join(CANDIDATES), help="comma-separated subset of the families")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "inr_defaults.json"))
    a = ap.parse_args()

    import numpy as np
    import torch

    from fewsound.fit import FitConfig, fit
    from fewsound.metrics import evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    clip_id, x = the_clip(a.length)
    load0 = os.getloadavg()
    results: dict[str, list[dict]] = {}
    for family in [f.strip() for f in a.families.split(",") if f.strip()]:
        rows = []
        for i, (label, overrides) in enumerate(CANDIDATES[family]):
            cfg = FitConfig(family=family, inr=overrides, steps=a.steps, log_every=a.steps)
            t = time.perf_counter()
            (r,) = fit(cfg, x[None])
            seconds = time.perf_counter() - t
            row = {"config": label, "default": i == 0, "seconds": round(seconds, 1), "diverged": r.diverged}
            if not r.diverged:
                ev = evaluate(x[None], np.asarray(r.reconstruction)[None], 22_050, metrics=["psnr", "si_snr"])[0]
                row.update(psnr=round(ev["psnr"], 2), si_snr=round(ev["si_snr"], 2))
            rows.append(row)
            print(f"{family:6s} {label:36s} PSNR {row.get('psnr', float('nan')):6.2f} dB  SI-SNR "
                  f"{row.get('si_snr', float('nan')):6.2f} dB  ({seconds:.0f} s){'  <- default' if i == 0 else ''}",
                  flush=True)  # fmt: skip
        results[family] = rows
        best = max((r for r in rows if "psnr" in r), key=lambda r: r["psnr"])
        print(f"{family:6s} best: {best['config']} ({best['psnr']} dB); default {rows[0].get('psnr')} dB\n")
        out = {  # written after each family: an interrupted run keeps the families it finished
            "clip": clip_id,
            "length": a.length,
            "steps": a.steps,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_avg_before": load0,
                "load_avg_after": os.getloadavg(),
            },
            "results": results,
        }
        Path(a.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
