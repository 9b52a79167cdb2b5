"""The training data on Ray Data: the corpus's splits as Ray Datasets (streamed from its shards, or handed over
through the object store for the built-in corpus), each worker's stream of random crops, its validation clips."""

from __future__ import annotations

from typing import Any

import numpy as np

from fewsound.errors import DataError


def quiet_ray_data() -> None:
    """No Ray Data progress bars: redrawn many times a second by every worker, they bury the training log."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def read_splits(c: Any, corpus: str) -> tuple[Any, Any]:
    """Ray Datasets of the train and validation splits (clip_id, audio). A corpus at a URI or on a shared mount
    is streamed by Ray Data's readers, on whichever nodes they run, from its shards (each reader opens its
    shards through pyarrow.fs, like fewsound.storage). The built-in corpus (builtin:<protocol>) is prepared on
    each machine that opens it; Ray Data's readers may run on a node that has not, so the driver reads its few
    MB and hands them to Ray's object store (ray.data.from_arrow), which every node reaches."""
    import ray.data

    from fewsound import storage
    from fewsound.data.builtin import SCHEME

    columns = ["clip_id", "audio"]
    if corpus.startswith(SCHEME):
        return ray.data.from_arrow(c.table("train", columns)), ray.data.from_arrow(c.table("validation", columns))
    fs = storage.location(c.location)[0]  # the same filesystem (and S3 endpoint) fewsound itself reads with

    def paths(split: str) -> list[str]:
        return [storage.location(p)[1] for p in c.shard_paths(split)]

    train = ray.data.read_parquet(paths("train"), filesystem=fs, columns=columns, shuffle="files")
    return train, ray.data.read_parquet(paths("validation"), filesystem=fs, columns=columns)


def _audio_matrix(batch: dict[str, Any]) -> np.ndarray:
    a = batch["audio"]
    return a.astype(np.float32) if a.dtype != object else np.stack([np.asarray(x, dtype=np.float32) for x in a])


def ray_batches(
    shard: Any,
    local_batch: int,
    length: int,
    *,
    seed: int,
    rank: int,
    start_epoch: int,
    cache: bool = False,
    augment: Any = None,
):
    """Endless stream of this worker's [local_batch, length] random crops from its Ray Data shard: pass after
    pass over the shard (each pass a new streaming-split epoch, locally shuffled), cropped at random.

    cache=True (the driver decides, for every worker alike, when a worker's share of the training split is small:
    CACHE_BYTES): the first pass is streamed and kept, later passes are random permutations of the kept rows.
    A pass over a small corpus (the built-in one: 33 segments) costs Ray Data seconds of scheduling for a few
    batches; a big corpus is always streamed. Every worker calls iter_batches the same number of times (once,
    or once per pass), as the streaming split requires. `augment`: fewsound.train.Augment for the crops.
    """
    from fewsound.train import crop_batch

    kept: list[np.ndarray] = []
    n_pass = 0
    while True:
        rng = np.random.default_rng([seed, rank, start_epoch, n_pass])
        got = 0
        if cache and n_pass > 0:
            rows = np.stack(kept)
            order = rng.permutation(len(rows))
            for i in range(0, len(order) - local_batch + 1, local_batch):
                got += 1
                yield crop_batch(rows[order[i : i + local_batch]], length, rng, augment)
        else:
            pending: list[np.ndarray] = []
            for batch in shard.iter_batches(
                batch_size=local_batch,
                batch_format="numpy",
                drop_last=False,
                local_shuffle_buffer_size=max(4 * local_batch, 32),
                local_shuffle_seed=int(rng.integers(2**31)),
            ):
                audio = _audio_matrix(batch)
                if cache:
                    kept.extend(audio)
                pending.extend(audio)
                while len(pending) >= local_batch:  # full batches only (drop_last), whatever the block sizes
                    got += 1
                    yield crop_batch(np.stack(pending[:local_batch]), length, rng, augment)
                    pending = pending[local_batch:]
        if got == 0:
            raise DataError(
                "train split",
                f"yields no full batch of {local_batch} clips per worker; use a smaller --batch-size or fewer workers",
            )
        n_pass += 1


def validation_clips(shard: Any, val_ids: list[str], val_kinds: list[str], rank: int, world: int, length: int):
    """This rank's validation clips (subset positions rank, rank + W, ...): (crops [v, length], ids, kinds)."""
    from fewsound.train import validation_crop

    mine = {cid: i for i, cid in enumerate(val_ids) if i % world == rank}
    found: dict[str, np.ndarray] = {}
    for batch in shard.iter_batches(batch_size=32, batch_format="numpy"):
        audio = _audio_matrix(batch)
        for cid, a in zip(batch["clip_id"], audio):
            if str(cid) in mine:
                found[str(cid)] = a
    order = sorted(found, key=mine.__getitem__)
    if len(found) != len(mine):
        raise DataError("validation split", f"rank {rank} found {len(found)} of its {len(mine)} validation clips")
    crops = validation_crop(np.stack([found[c] for c in order]), length) if order else np.zeros((0, length), np.float32)
    return crops, order, [val_kinds[mine[c]] for c in order]
