"""Training throughput: samples/s per worker, and scaling from 1 to 2 data-parallel CPU workers (Ray Train, DDP
over gloo), with the KAN target on its fast path; the reference (recursion) KAN path on 1 worker as the
baseline of the same run.

    python benchmarks/train_speed.py                       # tiny hypernetwork, real 32,768-sample clips
    python benchmarks/train_speed.py --preset 17.5M --steps 3

Each configuration trains `--steps` timed steps (after 2 warm-up steps) of `fewsound.train.train_step` on
random crops of the built-in corpus's training segments, `--batch-per-worker` clips per worker (weak scaling:
the global batch grows with the workers, as when adding GPUs). Workers hold one CPU and one torch thread each.
Reported: samples/s per worker and in total, and the scaling efficiency total(2) / (2 x total(1)). On a
shared 2-core machine the other engineers' processes compete for the same cores: read ratios, not absolutes.
Writes benchmarks/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "train_speed.json"


def _worker(config):
    import ray.train
    import ray.train.torch
    import torch

    from fewsound.hyper import HyperConfig, build_model
    from fewsound.train import TrainConfig, make_optimizer, random_batches, train_step

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model_cfg = HyperConfig(**config["model"])
    assert model_cfg.target_config().implementation == config["kan_path"]
    b = config["batch_per_worker"]
    cfg = TrainConfig(model=model_cfg, lr=1e-5, batch_size=b * world, samples_per_epoch=b * world * 1000, epochs=1)
    model = build_model(cfg.model, verbose=False)
    optimizer, scheduler = make_optimizer(model, cfg)
    ddp = ray.train.torch.prepare_model(model)
    stream = random_batches(
        np.load(config["segments"]), cfg.batch_size, cfg.model.clip_length, seed=0, rank=rank, world_size=world
    )
    times = []
    for i in range(config["steps"] + 2):
        batch = next(stream)
        t0 = time.perf_counter()
        train_step(ddp, batch, optimizer, scheduler=scheduler)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    # (Ray Train V2 keeps reported metrics only with checkpoints: each rank writes its timing to a file)
    Path(config["out"]).joinpath(f"rank{rank}.json").write_text(json.dumps({"step_s": float(np.median(times))}))
    ray.train.report({"rank": rank})


def measure(
    segments_path: str, model: dict, workers: int, batch_per_worker: int, steps: int, kan_path: str, storage: str
) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = Path(storage) / f"timings-{workers}-{kan_path}"
    out.mkdir(parents=True, exist_ok=True)
    TorchTrainer(
        _worker,
        train_loop_config={
            "segments": segments_path,
            "model": model,
            "batch_per_worker": batch_per_worker,
            "steps": steps,
            "kan_path": kan_path,
            "out": str(out),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"speed-{workers}-{kan_path}-{time.time_ns()}", storage_path=storage),
    ).fit()
    step_s = max(json.loads(f.read_text())["step_s"] for f in out.glob("rank*.json"))  # DDP: the slowest rank
    per_worker = batch_per_worker / step_s
    return {
        "workers": workers,
        "kan_path": kan_path,
        "step_s": step_s,
        "samples_per_s_per_worker": per_worker,
        "samples_per_s_total": per_worker * workers,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="hypernetwork size preset (default tiny)")
    p.add_argument("--clip-length", type=int, default=32_768, help="samples per clip (default 32,768, the paper's)")
    p.add_argument("--batch-per-worker", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    import tempfile

    import ray
    import torch

    from fewsound.data.corpus import open_corpus
    from fewsound.data.prepare import prepare_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus_dir = Path(tmp) / "corpus"
        prepare_corpus("builtin", out=corpus_dir, protocol="fewsound")
        segments, _ = open_corpus(corpus_dir).arrays("train")
        np.save(Path(tmp) / "segments.npy", segments)
        model = {"kind": "fewsound", "target": "kan", "preset": args.preset, "clip_length": args.clip_length}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs = []
        try:
            for workers, path in ((1, "recursion"), (1, "fast"), (2, "fast")):
                m = dict(model, target_overrides={"implementation": path})
                r = measure(
                    str(Path(tmp) / "segments.npy"),
                    m,
                    workers,
                    args.batch_per_worker,
                    args.steps,
                    path,
                    str(Path(tmp) / "ray"),
                )
                runs.append(r)
                print(
                    f"{workers} worker(s), KAN {path:9s}: {r['step_s']:.3f} s/step, "
                    f"{r['samples_per_s_per_worker']:.2f} samples/s per worker, "
                    f"{r['samples_per_s_total']:.2f} total",
                    flush=True,
                )
        finally:
            ray.shutdown()
    one, two = runs[1], runs[2]
    efficiency = two["samples_per_s_total"] / (2 * one["samples_per_s_total"])
    fast_vs_recursion = one["samples_per_s_total"] / runs[0]["samples_per_s_total"]
    print(
        f"scaling 1 -> 2 CPU workers: {two['samples_per_s_total'] / one['samples_per_s_total']:.2f}x total "
        f"throughput, efficiency {efficiency:.0%}"
    )
    print(f"fast KAN path vs recursion (1 worker): {fast_vs_recursion:.2f}x")
    out = {
        "benchmark": "train_speed",
        "device": "cpu",
        "cpus_visible": __import__("os").cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "model": model,
        "batch_per_worker": args.batch_per_worker,
        "timed_steps": args.steps,
        "runs": runs,
        "scaling_efficiency_1_to_2": efficiency,
        "fast_vs_recursion_1_worker": fast_vs_recursion,
        "note": "CPU workers with 1 thread each on a shared, contended 2-core machine; ratios from one run",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
