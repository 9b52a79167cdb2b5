"""Whole KAN fit steps: fewsound's fit() against an independent dense KAN and against the machine's matmul floor.

    python benchmarks/fit_step.py [--threads 1,all] [--packs 1,8,32] [--n 32768] [--steps 3] [--rounds 3]
                                  [--variants bf16,compile] [--variant-packs 1] [--quality-steps 0]
                                  [--profile] [--device cpu|cuda] [--out benchmarks/results/fit_step.json]
    python benchmarks/fit_step.py --report benchmarks/results/fit_step.json   # print a saved result

One step = forward, the paper's loss (L1 + 5-resolution mel-STFT), backward and an AdamW update, on one real
speech clip of N samples (32,768 = 1.5 s at 22,050 Hz), Table 1's KAN (fewsound's `table1()` preset).

- fewsound: `fewsound.fit.fit` itself, the path users run (per-step times from a logger called every step).
  Packs of B clips: the per-clip time is the step time / B.
- baseline: an independent, straightforward dense KAN written here as a plain `nn.Module` (efficient-kan's
  formulation, our own code): the Cox-de Boor recursion over all G + k bases of every input, one matmul of the
  flattened basis with the scaled spline weights plus one of SiLU(x) with the base weights per layer; the same
  loss written with torch.stft and torchaudio's Slaney mel filterbanks (target features computed once, as fewsound
  does) and torch.optim.AdamW. It is loaded with fewsound's initial weights and its first output is checked
  against fewsound's (same function). A user fits B clips with it one after the other, so its per-clip time is
  its single-clip step time whatever B is.
- floor: a dense MLP with the same matmul work per step as the dense KAN formulation: layer l of the KAN is an
  [N, in_l * (G + k + 1)] x [in_l * (G + k + 1), out_l] product, and the MLP 20 -> 624 -> 24 -> 156 -> 1 (SiLU
  between) has exactly those products' FLOPs (20 * 624 = 260 * 48, 624 * 24, 24 * 156 = 312 * 12, 156 * 1), on
  the same encoding, with the same loss and AdamW. Its step is what the machine does for the KAN's dense work
  when that work is one matmul per layer: the distance of fewsound's step to it is the overhead left.

- variants of fewsound (`--variants`, at the `--variant-packs` sizes): `bf16` (FitConfig precision "bf16": the
  INR forward under bfloat16 autocast) and `compile` (FitConfig compile "default": torch.compile of the INR
  forward). Every fewsound row also records its first step's wall time (allocations, and a compile's cost).
  `--quality-steps N` fits the clip N steps at full and at bf16 precision (B = 1, all threads) and reports loss and
  PSNR of both: what bf16 costs in fidelity.

The three run interleaved in one process per thread count (baseline steps, floor steps, then each fewsound pack,
repeated `--rounds` times, each round starting one row later), and medians are reported: other jobs on a shared
machine slow all three alike. Wall time and process CPU time (all threads) are both reported: on a machine loaded
beyond its cores, wall time measures the scheduler more than the step, and CPU time is the figure to compare.
The 1-minute load average is recorded around every round. Peak memory is measured apart, in a fresh process
per variant (high-water RSS minus the RSS before the first step), at the first thread count. `--profile` adds
torch.profiler's top operators of fewsound's B = 1 step (at the first thread count). Prints a table per thread
count and, for several, each variant's speed-up from the first count to the last and what 10x the baseline asks
there in multiples of the floor; writes benchmarks/results/fit_step.json (after each thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SR = 22_050
RESOLUTIONS = ((2048, 512, 2048), (1024, 256, 1024), (512, 128, 512), (256, 64, 256), (128, 32, 128))


# --- the independent baseline ------------------------------------------------------------------------------------


def build_baseline(torch, nn, cfg):
    """A dense KAN as a new user would write it (efficient-kan's formulation), plus its loss, as classes."""
    F = nn.functional

    class DenseKanLayer(nn.Module):
        def __init__(self, n_in, n_out, grid_size, order, grid_range):
            super().__init__()
            h = (grid_range[1] - grid_range[0]) / grid_size
            grid = torch.arange(-order, grid_size + order + 1, dtype=torch.float32) * h + grid_range[0]
            self.register_buffer("grid", grid.expand(n_in, -1).contiguous())  # [in, G + 2k + 1]
            self.order = order
            self.base_weight = nn.Parameter(torch.empty(n_out, n_in))
            self.spline_weight = nn.Parameter(torch.empty(n_out, n_in, grid_size + order))
            self.spline_scaler = nn.Parameter(torch.empty(n_out, n_in))

        def b_splines(self, x):  # [N, in] -> [N, in, G + k], Cox-de Boor over all bases
            g = self.grid
            x = x.unsqueeze(-1)
            bases = ((x >= g[:, :-1]) & (x < g[:, 1:])).to(x.dtype)
            for p in range(1, self.order + 1):
                bases = (x - g[:, : -(p + 1)]) / (g[:, p:-1] - g[:, : -(p + 1)]) * bases[:, :, :-1] + (
                    g[:, p + 1 :] - x
                ) / (g[:, p + 1 :] - g[:, 1:(-p)]) * bases[:, :, 1:]
            return bases

        def forward(self, x):  # [N, in] -> [N, out]
            base = F.linear(F.silu(x), self.base_weight)
            scaled = self.spline_weight * self.spline_scaler.unsqueeze(-1)
            spline = F.linear(self.b_splines(x).view(x.shape[0], -1), scaled.view(scaled.shape[0], -1))
            return base + spline

    class DenseKan(nn.Module):
        def __init__(self, encoding_length, widths, grid_size, order, grid_range):
            super().__init__()
            self.register_buffer("freq", 2.0 ** torch.arange(encoding_length, dtype=torch.float32) * math.pi)
            dims = [2 * encoding_length, *widths, 1]
            self.layers = nn.ModuleList(
                DenseKanLayer(a, b, grid_size, order, grid_range) for a, b in zip(dims[:-1], dims[1:])
            )

        def forward(self, t):  # [N] -> [N]
            angle = t.unsqueeze(-1) * self.freq
            x = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
            for layer in self.layers:
                x = layer(x)
            return x.squeeze(-1)

    return DenseKan(cfg.encoding_length, cfg.widths, cfg.grid_size, cfg.spline_order, cfg.grid_range)


def build_floor(torch, nn, encoding_length):
    """The dense MLP with the dense KAN's matmul FLOPs per layer (see the module docstring)."""

    class FloorMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("freq", 2.0 ** torch.arange(encoding_length, dtype=torch.float32) * math.pi)
            dims = [2 * encoding_length, 624, 24, 156, 1]
            self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))

        def forward(self, t):
            angle = t.unsqueeze(-1) * self.freq
            x = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < len(self.layers) - 1:
                    x = nn.functional.silu(x)
            return x.squeeze(-1)

    return FloorMlp()


class PlainLoss:
    """L1 + the mean over 5 resolutions of (L1 + RMSE) of Slaney mel magnitudes, written with torch/torchaudio."""

    def __init__(self, torch, target, n_mels):
        import torchaudio

        self.torch, self.target = torch, target
        self.windows = [torch.hann_window(w, device=target.device) for _, _, w in RESOLUTIONS]
        self.banks = [
            torchaudio.functional.melscale_fbanks(n // 2 + 1, 0.0, SR / 2, m, SR, norm="slaney", mel_scale="slaney").to(
                target.device
            )
            for (n, _, _), m in zip(RESOLUTIONS, n_mels)
        ]
        with torch.no_grad():
            self.target_mels = [self.mel(target, i) for i in range(len(RESOLUTIONS))]

    def mel(self, x, i):
        n_fft, hop, win = RESOLUTIONS[i]
        spec = self.torch.stft(
            x, n_fft, hop, win, self.windows[i], center=True, pad_mode="reflect", return_complex=True
        )
        mag = (spec.real**2 + spec.imag**2).clamp_min(1e-8).sqrt()  # [F, frames]
        return self.banks[i].T @ mag

    def __call__(self, pred):
        torch = self.torch
        total = (pred - self.target).abs().mean()
        spectral = 0.0
        for i, target_mel in enumerate(self.target_mels):
            diff = self.mel(pred, i) - target_mel
            spectral = spectral + diff.abs().mean() + torch.sqrt((diff**2).mean())
        return total + spectral / len(RESOLUTIONS)


# --- measurement (child process) -----------------------------------------------------------------------------------


def speech(n: int, count: int):
    """`count` peak-normalised real speech crops of n samples (different recordings, tiled up to n if short)."""
    import numpy as np

    from fewsound.data.builtin import builtin_corpus

    clips = [c for c in builtin_corpus() if c.kind == "speech"]
    out = []
    for i in range(count):
        x = clips[i % len(clips)].load(sr=SR)
        x = np.resize(x, n + 997 * (i // len(clips)))[-n:]
        out.append((x / max(np.abs(x).max(), 1e-4)).astype(np.float32))
    return out


class Setup:
    """Everything one thread count needs: the fewsound config, the baseline and floor models with their steps."""

    def __init__(self, n: int, packs: list[int], check: bool = True, device: str = "cpu"):
        import torch
        from torch import nn

        from fewsound.fit import FitConfig
        from fewsound.inr import build_inr, coordinates
        from fewsound.inr.presets import table1
        from fewsound.losses import RESOLUTIONS as FS_RESOLUTIONS
        from fewsound.losses import mel_bands_for

        assert tuple(FS_RESOLUTIONS) == RESOLUTIONS
        self.torch = torch
        self.clips = speech(n, max(packs))
        self.config = FitConfig(family="kan", inr=table1()["kan"], steps=1, log_every=1, device=device)
        self.cuda = device.startswith("cuda")
        inr = build_inr("kan", **table1()["kan"])
        c = inr.config
        t = coordinates(n, device=device)
        target = torch.from_numpy(self.clips[0]).to(device)
        n_mels = [mel_bands_for(n_fft) for n_fft, _, _ in RESOLUTIONS]

        self.baseline = build_baseline(torch, nn, c)
        params, buffers = inr.init([self.config.seed], device=device)
        self.baseline.to(device)
        with torch.no_grad():  # fewsound's initial weights, so both compute the same function
            for i, layer in enumerate(self.baseline.layers):
                layer.base_weight.copy_(params[f"bw{i}"][0])
                layer.spline_weight.copy_(params[f"sw{i}"][0])
                layer.spline_scaler.copy_(params[f"ss{i}"][0])
            # (skipped by the memory children: the freed tensors of this forward would stay in the process's
            # heap and hide the growth of the step they measure)
            same = (self.baseline(t) - inr(params, t, buffers)[0]).abs().max().item() if check else 0.0
        assert same < 1e-4, f"baseline and fewsound differ at init by {same}"
        self.max_abs_init_diff = same
        self.floor = build_floor(torch, nn, c.encoding_length).to(device)
        self.floor_params = sum(p.numel() for p in self.floor.parameters())
        self.steps = {}
        for name, model in (("baseline", self.baseline), ("floor", self.floor)):
            loss = PlainLoss(torch, target, n_mels)
            opt = torch.optim.AdamW(model.parameters(), lr=self.config.resolved_lr)
            self.steps[name] = self._step(model, loss, opt, t)

    def _step(self, model, loss, opt, t):
        def step():
            opt.zero_grad()
            loss(model(t)).backward()
            opt.step()

        return step

    def time_model(self, name: str, steps: int) -> list[tuple[float, float]]:
        """(wall, process CPU) seconds of each of `steps` steps after a warm-up step."""
        step = self.steps[name]
        sync = self.torch.cuda.synchronize if self.cuda else (lambda: None)  # a CUDA step ends on the device
        step()
        sync()
        out = []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync()
            out.append((time.perf_counter() - t0, time.process_time() - c0))
        return out

    def time_fewsound(self, batch: int, steps: int, variant: str = "") -> tuple[list[tuple[float, float]], float]:
        """(wall, process CPU) seconds of `steps` steps of one fit() of the first `batch` clips, and the wall
        seconds from the call to the end of its first step (a compile happens there)."""
        from dataclasses import replace

        from fewsound.fit import fit

        marks: list[tuple[float, float]] = []

        class Clock:
            def log_metrics(self, metrics, step):
                marks.append((time.perf_counter(), time.process_time()))

        t0 = time.perf_counter()
        fit(replace(self.config, steps=steps + 1, **VARIANTS[variant]), self.clips[:batch], logger=Clock())
        # the first step (allocations, compilation) is the warm-up
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks[:-1], marks[1:])], marks[0][0] - t0


# fewsound variants: FitConfig overrides
VARIANTS: dict[str, dict] = {"": {}, "bf16": {"precision": "bf16"}, "compile": {"compile": "default"}}


def fewsound_runs(args) -> list[tuple[str, str, int]]:
    """(row name, variant, B) of every fewsound row: the packs, then each variant at its pack sizes."""
    runs = [(f"fewsound_B{b}", "", b) for b in args.packs]
    return runs + [(f"fewsound_{v}_B{b}", v, b) for v in args.variants for b in args.variant_packs]


def child_times(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    s = Setup(args.n, args.packs + args.variant_packs, device=args.device)
    runs = fewsound_runs(args)
    times: dict[str, list[tuple[float, float]]] = {"baseline": [], "floor": [], **{r[0]: [] for r in runs}}
    first_step: dict[str, list[float]] = {r[0]: [] for r in runs}
    loads = [os.getloadavg()[0]]
    order = [("baseline", "", 1), ("floor", "", 1), *runs]
    for round_ in range(args.rounds):
        # each round starts one row later: no row always follows the baseline, whose gigabyte of freed tensors
        # keeps the kernel busy (page reclaim) for a while after it - a penalty for whatever runs next
        for name, variant, b in order[round_ % len(order) :] + order[: round_ % len(order)]:
            if name in ("baseline", "floor"):
                times[name] += s.time_model(name, args.steps)
                continue
            steps = args.steps if b <= 8 else max(1, args.steps // 2)
            timed, first = s.time_fewsound(b, steps, variant)
            times[name] += timed
            first_step[name].append(first)
        loads.append(os.getloadavg()[0])
    out = {"times_wall_cpu_s": times, "load_average_1m": loads, "max_abs_init_diff": s.max_abs_init_diff}
    out["first_step_wall_s"] = first_step
    out["floor_params"] = s.floor_params
    if args.profile:
        out["profile_fewsound_B1"] = profile_fewsound(s)
    return out


def profile_fewsound(s: Setup) -> list[dict]:
    """torch.profiler's top operators (self CPU time) over 3 fewsound B = 1 steps."""
    from dataclasses import replace

    from torch.profiler import ProfilerActivity, profile

    from fewsound.fit import fit

    fit(replace(s.config, steps=1), s.clips[:1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fit(replace(s.config, steps=3), s.clips[:1])
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [
        {"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / 3, "share": e.self_cpu_time_total / total}
        for e in rows[:15]
    ]


def child_memory(args) -> dict:
    """Peak RSS growth of 2 steps of one variant (`args.variant`), in this fresh process.

    The set-up skips its check of the baseline against fewsound (a dense forward whose freed memory the heap would
    keep, and reuse for the step), and the kernel's high-water mark is reset after it (Linux: "5" to
    /proc/self/clear_refs) and read back from VmHWM."""
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    runs = {name: (variant, b) for name, variant, b in fewsound_runs(args)}
    s = Setup(args.n, [runs[args.variant][1] if args.variant in runs else 1], check=False, device=args.device)
    if s.cuda:  # on CUDA: the allocator's peak during the steps, above what the set-up holds
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        rss0 = psutil.Process().memory_info().rss
    if args.variant in runs:
        variant, b = runs[args.variant]
        s.time_fewsound(b, 1, variant)
    else:
        s.time_model(args.variant, 1)
    if s.cuda:
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    return {"peak_mb": (hwm_kb * 1024 - rss0) / 2**20}


# --- driver --------------------------------------------------------------------------------------------------------


def child_quality(args) -> dict:
    """Loss and PSNR after `args.quality_steps` steps of a B = 1 fit at full and at bf16 precision."""
    from dataclasses import replace

    import numpy as np
    import torch

    from fewsound.fit import fit
    from fewsound.metrics.signal import psnr

    torch.set_num_threads(args.threads)
    s = Setup(args.n, [1], device=args.device)
    clip = s.clips[0]
    out = {"steps": args.quality_steps, "n": args.n}
    for name in ("full", "bf16"):
        t0 = time.perf_counter()
        (r,) = fit(replace(s.config, steps=args.quality_steps, log_every=10**9, precision=name), clip)
        out[name] = {
            "loss": r.loss,
            "psnr_db": float(psnr(clip[None], r.reconstruction[None])[0]),
            "seconds": time.perf_counter() - t0,
            "max_abs_diff_vs_full": None,
        }
        out.setdefault("_preds", {})[name] = r.reconstruction
    preds = out.pop("_preds")
    out["bf16"]["max_abs_diff_vs_full"] = float(np.abs(preds["bf16"] - preds["full"]).max())
    return out


def run_child(args, threads: int, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(threads), "--n", str(args.n), "--steps", str(args.steps)]
    cmd += ["--rounds", str(args.rounds), "--packs", ",".join(map(str, args.packs)), *extra]
    cmd += ["--variants", ",".join(args.variants), "--variant-packs", ",".join(map(str, args.variant_packs))]
    cmd += ["--quality-steps", str(args.quality_steps), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def summarise(threads: int, args, timing: dict, memory: dict) -> list[dict]:
    """Per variant: median wall and process-CPU ms per step and per clip, ratios to the baseline and the floor."""
    times = timing["times_wall_cpu_s"]
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    loads = timing["load_average_1m"]
    rows = []
    for name, batch in (("baseline", 1), ("floor", 1), *[(r[0], r[2]) for r in fewsound_runs(args)]):
        first = timing["first_step_wall_s"].get(name)
        rows.append(
            {
                "variant": name,
                "threads": threads,
                "B": batch,
                "first_step_s": max(first) if first else None,  # the first round's: a compile happens there
                "load_average_1m": [min(loads), max(loads)],
                "steps_timed": len(times[name]),
                "ms_per_step": 1e3 * wall[name],
                "ms_per_clip_step": 1e3 * wall[name] / batch,
                "cpu_ms_per_clip_step": 1e3 * cpu[name] / batch,
                "speedup_vs_baseline": wall["baseline"] / (wall[name] / batch),
                "speedup_vs_baseline_cpu": cpu["baseline"] / (cpu[name] / batch),
                "x_floor": wall[name] / batch / wall["floor"],
                "x_floor_cpu": cpu[name] / batch / cpu["floor"],
                "peak_memory_mb": memory[name],
            }
        )
    return rows


def report(threads: int, rows: list[dict], timing: dict) -> None:
    loads = ", ".join(f"{v:.1f}" for v in timing["load_average_1m"])
    print(f"threads={threads}  load average (1 min) around the rounds: {loads}")
    print(
        f"{'variant':22} {'B':>3} {'ms/step':>9} {'ms/clip':>9} {'vs baseline':>12} {'x floor':>8} "
        f"{'cpu ms/clip':>12} {'vs base cpu':>12} {'x floor cpu':>12} {'peak MB':>8} {'1st step s':>10}"
    )
    for r in rows:
        first = "" if r["first_step_s"] is None else f"{r['first_step_s']:10.1f}"
        print(
            f"{r['variant']:22} {r['B']:3d} {r['ms_per_step']:9.1f} {r['ms_per_clip_step']:9.1f} "
            f"{r['speedup_vs_baseline']:11.2f}x {r['x_floor']:8.2f} {r['cpu_ms_per_clip_step']:12.1f} "
            f"{r['speedup_vs_baseline_cpu']:11.2f}x {r['x_floor_cpu']:12.2f} {r['peak_memory_mb']:8.0f} {first}"
        )
    for p in timing.get("profile_fewsound_B1", []):
        print(f"  {p['op']:45} {p['self_ms_per_step']:8.1f} ms/step {100 * p['share']:5.1f}%")
    sys.stdout.flush()


def scaling(result: dict) -> dict:
    """From the first to the last thread count: each variant's wall ms per clip step and its speed-up, and what
    10x the baseline asks at the last count, in ms and in multiples of that count's floor."""
    first, last = result["runs"][0], result["runs"][-1]
    ms = [{r["variant"]: r["ms_per_clip_step"] for r in run["rows"]} for run in (first, last)]
    rows = {v: {"ms": [ms[0][v], ms[1][v]], "speedup": ms[0][v] / ms[1][v]} for v in ms[1] if v in ms[0]}
    target = ms[1]["baseline"] / 10
    return {
        "threads": [first["threads"], last["threads"]],
        "variants": rows,
        "ten_x_baseline_ms": target,
        "ten_x_baseline_x_floor": target / ms[1]["floor"],
    }


def report_scaling(sc: dict) -> None:
    a, b = sc["threads"]
    print(f"from {a} to {b} threads (wall ms per clip step):")
    for v, r in sc["variants"].items():
        print(f"  {v:22} {r['ms'][0]:9.1f} -> {r['ms'][1]:9.1f}   {r['speedup']:.2f}x")
    print(
        f"  10x the baseline at {b} threads is {sc['ten_x_baseline_ms']:.1f} ms per clip step: "
        f"{sc['ten_x_baseline_x_floor']:.2f}x that count's floor"
    )


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,all", help="comma-separated torch thread counts; 'all' = every core")
    ap.add_argument("--packs", default="1,8,32", help="fewsound pack sizes B (per-clip times are compared)")
    ap.add_argument("--variants", default="", help="fewsound variants to add: bf16, compile (comma-separated)")
    ap.add_argument("--variant-packs", default="1", help="pack sizes B of the variants")
    ap.add_argument("--quality-steps", type=int, default=0, help="steps of the full vs bf16 quality fit (0: none)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (every model, fit and loss on that device)")
    ap.add_argument("--n", type=int, default=32_768)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round (after a warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="add torch.profiler's top ops of fewsound's step")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fit_step.json")
    ap.add_argument("--report", type=Path, help="print the tables of a saved result (no measuring)")
    ap.add_argument("--child", choices=["times", "memory", "quality"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.packs = [int(b) for b in str(args.packs).split(",")]
    args.variant_packs = [int(b) for b in str(args.variant_packs).split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS) - {""}
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; valid: bf16, compile")
    if args.child:
        args.threads = int(args.threads)
        child = {"times": child_times, "memory": child_memory, "quality": child_quality}[args.child]
        print(json.dumps(child(args)))
        return 0

    if args.report:
        saved = json.loads(args.report.read_text())
        for run in saved["runs"]:
            report(run["threads"], run["rows"], run)
        if len(saved["runs"]) > 1:
            report_scaling(scaling(saved))
        return 0
    if args.device.startswith("cuda") and not __import__("torch").cuda.is_available():
        print("no CUDA device here: run with --device cpu", file=sys.stderr)
        return 2
    thread_counts = sorted({os.cpu_count() if v == "all" else int(v) for v in args.threads.split(",")})
    variants = ["baseline", "floor", *[r[0] for r in fewsound_runs(args)]]
    result = {
        "what": "whole fit step (forward, L1 + 5-resolution mel-STFT loss, backward, AdamW), Table 1 KAN, one "
        f"{args.n}-sample speech clip per network; medians of interleaved steps",
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "device": args.device,
        "device_name": __import__("torch").cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": __import__("torch").__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "variant", "out")},
        "runs": [],
    }
    memory: dict[str, float] = {}
    for threads in thread_counts:
        # the profile at the first count only: at several threads a single clip's samples run on worker threads,
        # whose ops torch.profiler does not see
        profile = args.profile and threads == thread_counts[0]
        extra = ["--child", "times"] + (["--profile"] if profile else [])
        timing = run_child(args, threads, extra)
        if not memory:  # peak memory hardly depends on the thread count: measured at the first one
            for v in variants:
                memory[v] = run_child(args, threads, ["--child", "memory", "--variant", v])["peak_mb"]
        rows = summarise(threads, args, timing, memory)
        result["runs"].append({"threads": threads, "rows": rows, **timing})
        report(threads, rows, timing)
        write_json(args.out, result)  # after every thread count: a long run killed later keeps what it measured
    if args.quality_steps:
        quality = run_child(args, thread_counts[-1], ["--child", "quality"])
        result["quality_bf16"] = quality
        print(f"quality after {quality['steps']} steps (B = 1, {thread_counts[-1]} threads):")
        for name in ("full", "bf16"):
            q = quality[name]
            print(f"  {name:5} loss {q['loss']:.5f}  PSNR {q['psnr_db']:.2f} dB  ({q['seconds']:.0f} s)")
        write_json(args.out, result)
    if len(result["runs"]) > 1:
        result["scaling"] = scaling(result)
        report_scaling(result["scaling"])
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
