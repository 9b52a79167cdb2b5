"""Prepare a corpus: import a dataset folder (or the built-in corpus) into Parquet shards + manifest.json, in
parallel with Ray (one task per shard). Re-running the same command resumes: finished shards are kept.

    python jobs/prepare_data.py                                   # built-in corpus, FewSound protocol
    python jobs/prepare_data.py --source ~/VCTK-Corpus-0.92 --protocol inr-1.5s --out data/vctk-inr
    python jobs/prepare_data.py --source ~/VCTK-Corpus-0.92 --protocol inr-3s --out s3://bucket/corpora/vctk-inr-3s
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/prepare_data.py --source /shared/vctk ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fewsound.cli import ArgumentParser
from fewsound.data.importers import KINDS, LAYOUTS  # noqa: E402
from fewsound.data.prepare import DEFAULT_SHARD_SIZE, finish_corpus, plan_corpus, summarize  # noqa: E402
from fewsound.data.protocols import PROTOCOLS  # noqa: E402
from fewsound.errors import FewsoundError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="builtin", help="dataset folder, or 'builtin' (default)")
    # choices are checked by the library, so a wrong one is a one-line `error: ...` like any other bad input
    p.add_argument("--layout", default="auto", help=f"folder layout: {', '.join(LAYOUTS)} (default: detect)")
    p.add_argument("--protocol", default="fewsound", help=f"the paper's data protocol: {', '.join(PROTOCOLS)}")
    p.add_argument(
        "--out",
        default="data/builtin",
        help="where the corpus goes: a folder, s3://bucket/path, gs://bucket/path (default: data/builtin)",
    )
    p.add_argument("--strict", action="store_true", help="a faulty input file aborts the import")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="source files per shard")
    p.add_argument("--seed", type=int, default=None, help="seed of the protocol's random picks and crops (default 0)")
    p.add_argument("--kind", default=None, help=f"{'/'.join(KINDS)}: kind of sound of a plain folder (default other)")
    p.add_argument("--address", default=None, help="Ray address (default: a local Ray on this machine)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--smoke-test", action="store_true", help="first small shard of each split only: seconds")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    shard_size = min(args.shard_size, 4) if args.smoke_test else args.shard_size
    plan = plan_corpus(args.source, out=args.out, layout=args.layout, protocol=args.protocol,
                       shard_size=shard_size, strict=args.strict, kind=args.kind, seed=args.seed)  # fmt: skip
    if args.smoke_test:  # the first shard of each split only: the same code path in seconds
        plan.shards = [s for i, s in enumerate(plan.shards) if i == 0 or s.split != plan.shards[i - 1].split]
    print(
        f"{len(plan.records)} source files ({plan.layout}) -> {len(plan.shards)} shards in {plan.out_dir}", flush=True
    )

    import ray  # here, not at the top: --help and argument errors stay instant

    from tune.ray_env import init_ray

    init_ray(args.address, num_cpus=args.num_cpus)  # the one way every job starts or joins Ray
    task = ray.remote(num_cpus=1, max_retries=1)(_process_shard)
    pending = {task.remote(s): s for s in plan.shards}
    results, t_work = [], time.perf_counter()
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        shard = pending.pop(ref)
        try:
            r = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a task's failure becomes one line, whatever it is
            for other in pending:
                ray.cancel(other)
            cause = getattr(e, "cause", None)
            if isinstance(cause, FewsoundError):
                raise cause from None
            last = str(cause or e).strip().splitlines()[-1:] or [type(e).__name__]
            raise RuntimeError(f"shard {shard.name} failed: {last[0]}") from None
        results.append(r)
        done, total = len(results), len(plan.shards)
        eta = (time.perf_counter() - t_work) / done * (total - done)
        note = "kept (complete from an earlier run)" if r.skipped else f"{r.seconds:.1f} s"
        print(f"[{done}/{total}] {r.name}: {r.rows} clips, {len(r.rejected)} rejected, {note}  ETA {eta:.0f} s",
              flush=True)  # fmt: skip

    manifest = finish_corpus(plan, results)
    print(summarize(manifest, plan.out_dir, time.perf_counter() - t0))
    if not sum(manifest["counts"].values()):
        raise FewsoundError(plan.out_dir, f"no usable clips: all {len(manifest['rejected'])} inputs were rejected")
    return 0


def _process_shard(shard):
    """A Ray task: one shard, on the CPU (a 0-GPU task hides the node's GPUs) at one thread."""
    import torch

    from fewsound.data.shards import process_shard
    from tune.ray_env import cpu_means_cpu

    cpu_means_cpu()
    torch.set_num_threads(1)
    return process_shard(shard)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (FewsoundError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
