"""Speed of the metrics: ms per 1.5 s clip per metric (one pair per call vs one batched call), and all metrics for
`--n` clips through evaluate() against the naive way - each package called once per pair, CDPAM with a fresh model
per pair (what the paper's code did) - with the values checked equal.

    python benchmarks/metrics_speed.py [--n 100] [--naive-n 4] [--device cpu|cuda] [--workers 0]

The naive cost is measured on `--naive-n` pairs and extrapolated linearly to n (said so in the output).
Also: CDPAM's network with torch's direct convolution vs the FFT convolutions fewsound uses on CPU (same pairs,
same process), and the sweep-shaped case - several reconstructions of each reference (one per INR family), where
the kept reference embeddings save their half of the network. Every timed CDPAM call starts with no kept
reference embeddings unless it says otherwise.
Prints the figures and writes benchmarks/results/metrics_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fewsound.data.builtin import builtin_corpus
from fewsound.metrics import METRICS, evaluate
from fewsound.metrics import cdpam as cd
from fewsound.metrics.common import resample_paper
from fewsound.metrics.lsd import lsd
from fewsound.metrics.pesq import pesq_scores
from fewsound.metrics.signal import mse, psnr, si_snr, snr
from fewsound.metrics.stoi import stoi_scores
from fewsound.metrics.wasserstein import wasserstein_hf

SR, N = 22_050, 32_768


def make_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n real 1.5 s speech clips (built-in corpus, several crops per recording) and noisy versions (5-30 dB)."""
    rng = np.random.default_rng(seed)
    speech = [c.load(sr=SR) for c in builtin_corpus() if c.kind == "speech"]
    refs = []
    for i in range(n):
        x = speech[i % len(speech)]
        start = int(rng.integers(0, len(x) - N + 1))
        refs.append(x[start : start + N] / np.abs(x[start : start + N]).max())
    refs = np.stack(refs).astype(np.float32)
    noise = rng.standard_normal(refs.shape)
    snr_db = rng.uniform(5, 30, size=(n, 1))
    noise *= np.sqrt(
        (refs.astype(np.float64) ** 2).sum(-1, keepdims=True) / (noise**2).sum(-1, keepdims=True) / 10 ** (snr_db / 10)
    )
    return refs, (refs + noise).astype(np.float32)


def naive_pair(ref: np.ndarray, rec: np.ndarray, device: str) -> dict:
    """Every metric of one pair the naive way: package calls per pair, a freshly loaded CDPAM model."""
    import librosa
    from pesq import pesq
    from pystoi import stoi

    r, d = ref[None], rec[None]
    out = {
        "mse": mse(r, d)[0],
        "psnr": psnr(r, d)[0],
        "snr": snr(r, d)[0],
        "si_snr": si_snr(r, d)[0],
        "lsd": lsd(r, d, SR)[0],
        "wd_hf": wasserstein_hf(r, d)[0],
    }
    r16 = librosa.resample(ref, orig_sr=SR, target_sr=16000, res_type="kaiser_best")
    d16 = librosa.resample(rec, orig_sr=SR, target_sr=16000, res_type="kaiser_best")
    out["pesq"] = pesq(16000, r16, d16, "wb")
    out["stoi"] = stoi(ref, rec, SR)
    model = cd.CDPAMModel(device)  # fresh model per pair, the package's own forward
    with torch.no_grad():
        out["cdpam"] = model.forward(cd.cdpam_inputs(r, SR), cd.cdpam_inputs(d, SR)).item()
    return {k: float(v) for k, v in out.items()}


def timed(fn, *args, sync: bool = False, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def per_metric(refs, recs, device: str, single_n: int) -> dict:
    """ms per clip for each metric: `single_n` calls with one pair each vs one call with all pairs."""
    fns = {
        "mse": lambda r, d: mse(r, d),
        "psnr": lambda r, d: psnr(r, d),
        "snr": lambda r, d: snr(r, d),
        "si_snr": lambda r, d: si_snr(r, d),
        "lsd": lambda r, d: lsd(r, d, SR),
        "wd_hf": lambda r, d: wasserstein_hf(r, d),
        "pesq": lambda r, d: list(pesq_scores(r, d, SR)),
        "stoi": lambda r, d: list(stoi_scores(r, d, SR)),
        "cdpam": lambda r, d: cd.cdpam_distance(r, d, SR, device=device),
    }
    table = {}
    forget = cd.load_cdpam(device).forget_refs
    for name, fn in fns.items():
        fn(refs[:1], recs[:1])  # warm-up: resampy's JIT, model load, cuDNN plans
        forget()
        _, t_single = timed(lambda fn=fn: [fn(refs[i : i + 1], recs[i : i + 1]) for i in range(single_n)], sync=True)
        forget()
        _, t_batch = timed(fn, refs, recs, sync=True)
        table[name] = {
            "single_ms_per_clip": 1e3 * t_single / single_n,
            "batched_ms_per_clip": 1e3 * t_batch / len(refs),
        }
        print(
            f"  {name:7s} single {table[name]['single_ms_per_clip']:9.2f} ms/clip   "
            f"batched {table[name]['batched_ms_per_clip']:9.2f} ms/clip"
        )
    return table


def cdpam_conv(refs, recs, device: str) -> dict:
    """CDPAM seconds per pair: torch's direct convolution vs the FFT path (fewsound's CPU default), same pairs."""
    out = {}
    for conv in ("direct", "fft"):
        model = cd.CDPAMModel(device, conv=conv)
        x, y = cd.cdpam_inputs(refs, SR), cd.cdpam_inputs(recs, SR)
        model.distance(x[:1], y[:1])
        model.forget_refs()
        d, t = timed(model.distance, x, y, sync=True)
        out[conv] = {"s_per_pair": t / len(refs), "distances": d.tolist()}
    rel = max(abs(a - b) / abs(b) for a, b in zip(out["fft"]["distances"], out["direct"]["distances"]))
    out["speedup"] = out["direct"]["s_per_pair"] / out["fft"]["s_per_pair"]
    out["max_rel_diff"] = rel
    print(
        f"CDPAM network on {len(refs)} pairs: direct convolution {out['direct']['s_per_pair']:.3f} s/pair, "
        f"FFT convolution {out['fft']['s_per_pair']:.3f} s/pair ({out['speedup']:.2f}x), max rel diff {rel:.1e}"
    )
    return out


def sweep_shaped(refs, device: str, per_ref: int = 6) -> dict:
    """evaluate() of `per_ref` reconstructions of each reference (a sweep's families) vs the same pairs one
    reference at a time with nothing kept: what keeping reference embeddings saves."""
    rng = np.random.default_rng(1)
    x = np.repeat(refs, per_ref, axis=0)
    y = (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)
    model = cd.load_cdpam(device)
    model.forget_refs()
    _, t_kept = timed(evaluate, x, y, SR, device=device, metrics=["cdpam"], sync=True)

    def each_forgotten():
        for i in range(len(x)):
            model.forget_refs()
            evaluate(x[i : i + 1], y[i : i + 1], SR, device=device, metrics=["cdpam"])

    _, t_forgot = timed(each_forgotten, sync=True)
    out = {
        "pairs": len(x),
        "per_ref": per_ref,
        "s_per_pair_kept": t_kept / len(x),
        "s_per_pair_uncached_single": t_forgot / len(x),
        "speedup": t_forgot / t_kept,
    }
    print(
        f"sweep-shaped CDPAM ({per_ref} reconstructions per reference, {len(x)} pairs): "
        f"{out['s_per_pair_kept']:.3f} s/pair with reference embeddings kept vs "
        f"{out['s_per_pair_uncached_single']:.3f} s/pair one uncached pair at a time ({out['speedup']:.2f}x)"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100 if torch.cuda.is_available() else 12, help="clips evaluated")
    p.add_argument("--naive-n", type=int, default=4, help="pairs timed the naive way (extrapolated to n)")
    p.add_argument("--device", default=cd.default_device())
    p.add_argument("--workers", type=int, default=0, help="processes for PESQ/STOI in evaluate()")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "metrics_speed.json")
    args = p.parse_args()
    naive_n = min(args.naive_n, args.n)
    refs, recs = make_pairs(args.n)
    print(f"{args.n} pairs of {N} samples at {SR} Hz, device {args.device}, torch threads {torch.get_num_threads()}")

    # Warm the one-off costs out of both timings (numba JIT of resampy, first CDPAM load from disk into page cache).
    resample_paper(refs[:1], SR, 16000)
    cd.CDPAMModel(args.device)

    print("per metric:")
    table = per_metric(refs[: min(args.n, 16)], recs[: min(args.n, 16)], args.device, single_n=min(4, args.n))

    conv = cdpam_conv(refs[: min(args.n, 8)], recs[: min(args.n, 8)], args.device)
    shaped = sweep_shaped(refs[: min(args.n, 4)], args.device)

    cd.load_cdpam(args.device).forget_refs()
    naive_rows, t_naive = timed(lambda: [naive_pair(refs[i], recs[i], args.device) for i in range(naive_n)], sync=True)
    t_naive_per_pair = t_naive / naive_n
    rows, t_ours = timed(evaluate, refs, recs, SR, device=args.device, workers=args.workers, sync=True)

    # Same values: bit-identical for every metric but CDPAM, whose faster encoder reassociates float32 sums.
    cdpam_rel = 0.0
    for i in range(naive_n):
        for m in METRICS:
            if m == "cdpam":
                cdpam_rel = max(cdpam_rel, abs(rows[i][m] - naive_rows[i][m]) / abs(naive_rows[i][m]))
            else:
                assert rows[i][m] == naive_rows[i][m], (i, m, rows[i][m], naive_rows[i][m])
    assert cdpam_rel < 1e-5, cdpam_rel

    naive_total = t_naive_per_pair * args.n
    result = {
        "machine": {
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "n_clips": args.n,
        "clip_samples": N,
        "sample_rate": SR,
        "workers": args.workers,
        "per_metric_ms_per_clip": table,
        "naive": {
            "pairs_timed": naive_n,
            "s_per_pair": t_naive_per_pair,
            "s_for_n_extrapolated": naive_total,
            "extrapolated": naive_n < args.n,
        },
        "evaluate": {"s_total": t_ours, "s_per_clip": t_ours / args.n},
        "speedup": naive_total / t_ours,
        "cdpam_conv": conv,
        "sweep_shaped": shaped,
        "values": {"bit_identical": [m for m in METRICS if m != "cdpam"], "cdpam_max_rel_diff": cdpam_rel},
    }
    print(
        f"naive: {t_naive_per_pair:.3f} s/pair measured on {naive_n} pairs -> {naive_total:.1f} s for {args.n}"
        f"{' (extrapolated)' if naive_n < args.n else ''}"
    )
    print(f"evaluate(): {t_ours:.1f} s for {args.n} clips ({t_ours / args.n:.3f} s/clip)")
    print(f"speed-up: {result['speedup']:.2f}x; values equal (CDPAM max rel diff {cdpam_rel:.1e})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
