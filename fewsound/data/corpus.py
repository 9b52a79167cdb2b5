"""A corpus by name or location, on top of the data package: `builtin:<protocol>` (the built-in corpus, prepared
on this machine the first time it is opened), a folder, or a URI (s3://..., gs://..., file://...).

    c = open_corpus("builtin:inr-1.5s")      # fewsound.data.shards.Corpus: clips read from Parquet shards
    c = open_corpus("s3://bucket/vctk-1.5s")
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fewsound import storage
from fewsound.data.builtin import SCHEME
from fewsound.data.prepare import prepare_corpus
from fewsound.data.protocols import PROTOCOLS
from fewsound.data.shards import Corpus, open_prepared
from fewsound.errors import ConfigError
from fewsound.storage import default_home


def open_corpus(where: str | Path, *, verify: bool = False) -> Corpus:
    """The prepared corpus at `where`: a folder, a URI or the name of the built-in corpus prepared with a protocol
    (`builtin:inr-1.5s`, see `resolve_builtin`). DataError when it is missing, unfinished or corrupt."""
    return open_prepared(resolve_builtin(where) or where, verify=verify)


def corpus_location(where: str | Path) -> str:
    """How to name a corpus to another process or node: builtin:<protocol> as is, a URI as is, a path absolute."""
    return str(where) if str(where).startswith(SCHEME) else storage.normalize(where)


def resolve_builtin(where: str | os.PathLike) -> str | None:
    """The local folder of `builtin:<protocol>` on this machine, prepared now if it is not yet (None for any
    other location). Concurrent callers on one machine (Ray workers) wait for one preparation (a file lock)."""
    text = str(where)
    if not text.startswith(SCHEME):
        return None
    protocol = text[len(SCHEME) :]
    if protocol not in PROTOCOLS:
        raise ConfigError(text, f"unknown protocol {protocol!r}; use builtin:<protocol>, one of {', '.join(PROTOCOLS)}")
    out = default_home() / "corpora" / f"builtin-{protocol}"
    if (out / "manifest.json").exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".builtin-{protocol}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.json").exists():  # another process may have finished it while we waited
            prepare_corpus("builtin", out=out, protocol=protocol)
    return str(out)
