"""Bytes autograd keeps per clip-sample for one training step of each INR family (fewsound.device's table).

    python benchmarks/clip_memory.py [--lengths 8192,16384,32768] [--out benchmarks/results/clip_memory.json]

For each family at its default (Table 1) size: the INR forward of one real speech clip of N samples in float32
and the paper's loss (fewsound.losses.ReconstructionLoss), with torch.autograd.graph.saved_tensors_hooks
counting the bytes of every tensor saved for backward (each storage once). That is what a step holds between its
forward and its backward; it depends on shapes only, so the CPU measures what a GPU will hold. It is linear in N:
the slope between the shortest and the longest length is the bytes per clip-sample, and the middle length checks
the line (`linearity`: measured / predicted). Batching B clips multiplies it by B (every activation has a leading
clip axis). Writes the rows; fewsound.device.BYTES_PER_SAMPLE is a copy of `bytes_per_sample` (tests check it).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def saved_bytes(family: str, clip) -> int:
    """Bytes saved for backward by one step's forward (INR + loss) of `clip` [1, N] (each storage counted once)."""
    import torch

    from fewsound.inr import build_inr, coordinates
    from fewsound.losses import ReconstructionLoss

    inr = build_inr(family)
    params, buffers = inr.init([0])
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    loss_fn = ReconstructionLoss(clip)
    seen: dict[tuple[int, int], int] = {}

    def pack(x):
        storage = x.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = loss_fn(inr(params, coordinates(clip.shape[1]), buffers))
    del loss
    return sum(seen.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,16384,32768", help="three or more clip lengths (samples)")
    ap.add_argument("--families", default="", help="comma-separated (default: all six)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "clip_memory.json")
    args = ap.parse_args()

    import torch

    from fewsound.inr import FAMILIES

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fit_step import speech

    lengths = sorted(int(n) for n in args.lengths.split(","))
    if len(lengths) < 3:
        ap.error("--lengths: give three or more lengths (two for the slope, one to check it)")
    families = [f for f in args.families.split(",") if f] or sorted(FAMILIES)
    clip = torch.as_tensor(speech(lengths[-1], 1)[0])[None]  # [1, N]
    rows = []
    print(f"{'family':8} {'bytes/sample':>13} {'linearity':>10} {'3 s clip MiB':>13}")
    for family in families:
        measured = {n: saved_bytes(family, clip[:, :n].contiguous()) for n in lengths}
        lo, hi = lengths[0], lengths[-1]
        slope = (measured[hi] - measured[lo]) / (hi - lo)
        mid = lengths[len(lengths) // 2]
        predicted = measured[lo] + slope * (mid - lo)
        row = {
            "family": family,
            "bytes_per_sample": round(slope, 1),
            "intercept_bytes": measured[lo] - slope * lo,
            "saved_bytes": {str(n): b for n, b in measured.items()},
            "linearity": measured[mid] / predicted,
        }
        rows.append(row)
        print(f"{family:8} {slope:13.1f} {row['linearity']:10.4f} {slope * 65_536 / 2**20:13.1f}")
    result = {
        "what": "bytes saved for backward per clip-sample, one float32 training step (INR forward + paper loss)",
        "torch": torch.__version__,
        "host": platform.node(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "lengths": lengths,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
