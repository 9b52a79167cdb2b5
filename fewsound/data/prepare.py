"""Import a source (a dataset folder or the built-in corpus) into a prepared corpus, in three steps:

    plan = plan_corpus(source, layout=..., protocol=..., out=...)   # scan + select + shard assignment (fast)
    results = [process_shard(s) for s in plan.shards]               # the work; jobs/prepare_data.py uses Ray
    manifest = finish_corpus(plan, results)                          # manifest.json

`prepare_corpus` runs the three serially (tests, notebooks, small folders).

`out` is a folder or a URI (`s3://bucket/corpus`, `gs://...`, a mounted path): shards, receipts and the
manifest are written there through fewsound.storage, never to a local folder named after the URI.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

from fewsound import storage
from fewsound.data.builtin import builtin_records
from fewsound.data.importers import LAYOUTS, SourceRecord, scan
from fewsound.data.protocols import Protocol, get_protocol, plan_items
from fewsound.data.shards import ShardPlan, ShardResult, plan_shards, process_shard, write_manifest
from fewsound.errors import DataError

DEFAULT_SHARD_SIZE = 64  # source files per shard: ~10 s of work per Ray task on VCTK, shards of ~10-20 MB


@dataclasses.dataclass
class CorpusPlan:
    source: str  # "builtin" or the absolute source folder
    layout: str
    protocol: Protocol
    out_dir: str  # an absolute path or a URI
    records: list[SourceRecord]
    shards: list[ShardPlan]


def plan_corpus(source: str | Path = "builtin", *, out: str | Path, layout: str = "auto",
                protocol: str | Protocol = "fewsound", shard_size: int = DEFAULT_SHARD_SIZE, strict: bool = False,
                kind: str | None = None, seed: int | None = None) -> CorpusPlan:  # fmt: skip
    """Scan `source`, apply `protocol` and assign the work to shards of `out`. Decodes no audio.

    DataError for a missing source, unknown layout or no audio; ConfigError for an unknown protocol.
    """
    if layout not in LAYOUTS:  # checked even for the built-in source, so a typo never passes silently
        raise DataError(layout, f"unknown layout; choose one of {', '.join(LAYOUTS)}")
    proto = get_protocol(protocol) if isinstance(protocol, str) else protocol
    if seed is not None:
        proto = dataclasses.replace(proto, seed=seed)
    if str(source) == "builtin":
        src, layout, records = "builtin", "builtin", builtin_records()
    else:
        src = str(Path(source).resolve())
        layout, records = scan(source, layout, kind=kind)
    out = storage.normalize(out)
    if storage.is_local(out):  # object stores have no folders: their objects appear with their keys
        Path(storage.location(out)[1]).mkdir(parents=True, exist_ok=True)
    shards = plan_shards(plan_items(records, proto), out, proto, shard_size=shard_size, strict=strict)
    return CorpusPlan(src, layout, proto, out, records, shards)


def finish_corpus(plan: CorpusPlan, results: list[ShardResult]) -> dict:
    """Write manifest.json for a plan whose every shard is done; returns the manifest."""
    assert sorted(r.name for r in results) == sorted(s.name for s in plan.shards), "a shard is missing"
    order = {s.name: i for i, s in enumerate(plan.shards)}
    results = sorted(results, key=lambda r: order[r.name])
    return write_manifest(plan.out_dir, results, source=plan.source, layout=plan.layout, protocol=plan.protocol,
                          n_inputs=len(plan.records))  # fmt: skip


def prepare_corpus(source: str | Path = "builtin", *, out: str | Path, **kwargs) -> dict:
    """plan_corpus + process_shard for every shard (serially) + finish_corpus. Returns the manifest."""
    plan = plan_corpus(source, out=out, **kwargs)
    return finish_corpus(plan, [process_shard(s) for s in plan.shards])


def summarize(manifest: dict, out_dir: str | Path, seconds: float | None = None, max_rejected: int = 20) -> str:
    """Human-readable multi-line summary of a prepared corpus."""
    total = sum(manifest["counts"].values())
    proto = manifest["protocol"]
    lines = [
        f"prepared {total} clips of {manifest['stored_length']} samples at {manifest['sample_rate']} Hz "
        f"(models see {manifest['clip_length']}) from {manifest['n_source_files']} source files"
        + (f" in {seconds:.1f} s" if seconds is not None else ""),
        f"  source {manifest['source']}  layout {manifest['layout']}  protocol {proto['name']} (seed {proto['seed']})",
    ]
    for split, n in manifest["counts"].items():
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(manifest["counts_by_kind"].get(split, {}).items()))
        spk = manifest["speakers"].get(split, [])
        shown = ", ".join(spk[:8]) + (f", ... ({len(spk)})" if len(spk) > 8 else "")
        lines.append(f"  {split:<10} {n:>6} clips  [{kinds}]  speakers: {shown}")
    rejected = manifest["rejected"]
    if rejected:
        faults = sum(r["fault"] for r in rejected)
        lines.append(
            f"  rejected {len(rejected)} files ({faults} faulty, {len(rejected) - faults} too short for the protocol):"
        )
        for why, n in Counter(re.split(r"[:(]", r["reason"])[0].strip() for r in rejected).most_common():
            lines.append(f"    {n:>6} x {why}")
        for r in rejected[:max_rejected]:
            lines.append(f"    {r['path']}: {r['reason']}")
        if len(rejected) > max_rejected:
            lines.append(f"    ... and {len(rejected) - max_rejected} more (all listed in manifest.json)")
    else:
        lines.append("  rejected 0 files")
    mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
    lines.append(f"  output {storage.normalize(out_dir)}  ({len(manifest['shards'])} shards, {mb:.1f} MB)")
    return "\n".join(lines)
