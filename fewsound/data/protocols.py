"""The paper's data protocols as named presets: which source files become which stored clips, in which split.

Two modes:
- `pick` (INR benchmark, Table 1 and appendix tables 18/19): `per_group` random files per group (seeded), each
  cropped at a random (seeded) start to `clip_length` samples. One split, "test".
- `segments` (FewSound / HyperSound training): every file is cut, after skipping its first `skip` samples
  (0.5 s), into non-overlapping `stored_length` = 65,536-sample segments; the remainder is dropped. Models see
  `clip_length` = 32,768 samples of each segment, cropped at load time (`load_crop`): at a random start for
  training, at start 0 for validation.

The FewSound split (`split_groups`): groups sorted (natural order; for VCTK identical to the paper's plain
sort), the last ones are validation. The paper holds out the last 10 of VCTK's 110 speakers; we hold out
`min(10, max(1, n // 5))` of n groups so a handful of groups still leaves most for training (110 -> 10, 5 -> 1),
and none when a kind has a single group. The rule runs per kind, so a mixed corpus (the built-in one: speech,
music, environment) has every kind in both splits. A layout that defines its own split (LibriSpeech
train-*/test-*, noisy VCTK trainset/testset) keeps it when it has both halves.

Every random choice comes from `stable_seed(seed, name...)`, never from global state, so a plan is the same in
every process and whatever the sharding.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict

import numpy as np

from fewsound.data.audio import DEFAULT_SR, TooShort, segment
from fewsound.data.importers import SourceRecord, natural_key
from fewsound.errors import ConfigError

CLIP_1_5S = 32_768  # "1.5 s" at 22,050 Hz (1.486 s)
CLIP_3S = 65_536  # "3 s" (2.972 s)


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    mode: str  # "pick" | "segments"
    clip_length: int  # samples a model sees
    stored_length: int  # samples stored per row
    per_group: int = 1  # pick: clips per group
    skip: int = 0  # segments: samples skipped at the start of every file
    sample_rate: int = DEFAULT_SR
    max_val_groups: int = 10  # segments: the paper's "last 10 speakers"
    seed: int = 0

    def __post_init__(self):
        assert self.mode in ("pick", "segments"), self.mode
        assert 0 < self.clip_length <= self.stored_length, (self.clip_length, self.stored_length)
        assert self.mode == "segments" or self.clip_length == self.stored_length


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol("inr-1.5s", "pick", CLIP_1_5S, CLIP_1_5S),
        Protocol("inr-3s", "pick", CLIP_3S, CLIP_3S),
        # appendix tables 18/19: 10 clips per GTZAN genre / UrbanSound8K fold
        Protocol("inr-1.5s-x10", "pick", CLIP_1_5S, CLIP_1_5S, per_group=10),
        Protocol("fewsound", "segments", CLIP_1_5S, CLIP_3S, skip=DEFAULT_SR // 2),
    ]
}


def get_protocol(name: str, **overrides) -> Protocol:
    """The preset `name`, with field overrides (e.g. `seed=1`). ConfigError for an unknown name or field."""
    if name not in PROTOCOLS:
        raise ConfigError(name, f"unknown protocol; choose one of {', '.join(PROTOCOLS)}")
    try:
        return dataclasses.replace(PROTOCOLS[name], **overrides)
    except TypeError as e:
        raise ConfigError(name, str(e)) from None


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from `parts`, the same in every process (unlike `hash()`)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def val_group_count(n_groups: int, max_val: int = 10) -> int:
    """How many of `n_groups` sorted groups are held out for validation (see the module docstring)."""
    return 0 if n_groups < 2 else min(max_val, max(1, n_groups // 5))


def split_groups(records: list[SourceRecord], protocol: Protocol) -> dict[tuple[str, str], str]:
    """{(kind, group): split}. `pick` protocols put everything in "test"."""
    keys = sorted({(r.kind, r.group) for r in records})
    if protocol.mode == "pick":
        return {k: "test" for k in keys}
    layout_splits = {r.split for r in records}
    if {"train", "validation"} <= layout_splits:
        return {(r.kind, r.group): r.split or "train" for r in records}
    by_kind: dict[str, list[str]] = defaultdict(list)
    for kind, group in keys:
        by_kind[kind].append(group)
    out = {}
    for kind, groups in by_kind.items():
        groups.sort(key=natural_key)
        n_val = val_group_count(len(groups), protocol.max_val_groups)
        for i, g in enumerate(groups):
            out[(kind, g)] = "validation" if i >= len(groups) - n_val else "train"
    return out


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One unit of import work. `segments`: one file. `pick`: a group's files in (seeded) random order, of which
    the first `take` that are usable become clips (a corrupt pick falls back to the next file)."""

    split: str
    kind: str
    group: str
    candidates: tuple[SourceRecord, ...]
    take: int  # 0 = every segment of the single candidate


def plan_items(records: list[SourceRecord], protocol: Protocol) -> list[WorkItem]:
    """Deterministic work items, sorted by (split, kind, group, utterance)."""
    splits = split_groups(records, protocol)
    by_group: dict[tuple[str, str], list[SourceRecord]] = defaultdict(list)
    for r in records:
        by_group[(r.kind, r.group)].append(r)
    items = []
    for (kind, group), recs in by_group.items():
        recs.sort(key=lambda r: natural_key(r.utterance))
        split = splits[(kind, group)]
        if protocol.mode == "pick":
            rng = np.random.default_rng(stable_seed(protocol.seed, "pick", kind, group))
            order = tuple(recs[i] for i in rng.permutation(len(recs)))
            items.append(WorkItem(split, kind, group, order, take=protocol.per_group))
        else:
            items.extend(WorkItem(split, kind, group, (r,), take=0) for r in recs)
    order_key = {"train": 0, "validation": 1, "test": 2}
    items.sort(
        key=lambda it: (order_key[it.split], it.kind, natural_key(it.group), natural_key(it.candidates[0].utterance))
    )
    return items


def clip_starts(n_samples: int, record: SourceRecord, protocol: Protocol) -> list[int]:
    """Starts of the clips `protocol` stores from a decoded file of `n_samples` samples (at its sample rate).

    AudioError ("too short") when the file yields none.
    """
    if protocol.mode == "pick":
        if n_samples < protocol.clip_length:
            raise TooShort(record.rel, f"too short: {n_samples} samples, need {protocol.clip_length} for one clip")
        rng = np.random.default_rng(stable_seed(protocol.seed, "crop", record.utterance))
        return [int(rng.integers(0, n_samples - protocol.clip_length + 1))]
    starts = segment(np.empty(n_samples, np.int8), protocol.stored_length, skip=protocol.skip)
    if not starts:
        raise TooShort(
            record.rel,
            f"too short: {n_samples} samples, need {protocol.skip + protocol.stored_length} "
            f"(skip {protocol.skip} + one segment of {protocol.stored_length})",
        )
    return starts


def crop_start(n_samples: int, length: int, *, split: str, seed: int = 0, index: int = 0, epoch: int = 0) -> int:
    """Load-time crop start: uniform in [0, n - length] for "train" (a pure function of seed, epoch and index,
    so every worker and every re-run draws the same crop), 0 for any other split (validation is deterministic)."""
    if n_samples < length:
        raise TooShort(f"clip {index}", f"too short: {n_samples} samples, need {length} for the load-time crop")
    if split != "train":
        return 0
    return int(np.random.default_rng(stable_seed(seed, epoch, index)).integers(0, n_samples - length + 1))


def load_crop(
    audio: np.ndarray, length: int, *, split: str, seed: int = 0, index: int = 0, epoch: int = 0
) -> np.ndarray:
    """The `length`-sample view of a stored clip a model trains or validates on. audio: [N] -> [length]."""
    s = crop_start(audio.shape[-1], length, split=split, seed=seed, index=index, epoch=epoch)
    return audio[..., s : s + length]
