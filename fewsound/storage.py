"""Where data and state live: a local folder, a mounted shared filesystem, or an object store, behind one small
interface on `pyarrow.fs` (the same filesystem layer Ray Data, Ray Tune and Ray Train use).

    location("s3://bucket/corpus")          (pyarrow FileSystem, "bucket/corpus")
    join("s3://bucket/corpus", "a.parquet")  "s3://bucket/corpus/a.parquet"
    write_bytes(uri, data)                   the object/file appears whole or not at all
    read_bytes(uri), exists(uri), size(uri), listdir(uri), delete(uri), sha256(uri)

A location is a URI with a scheme (`s3://`, `gs://`, `file://`, anything `pyarrow.fs.FileSystem.from_uri`
reads) or a plain path (a local or mounted folder; made absolute by `normalize`). Credentials come from each
store's usual chain (environment, ~/.aws, an instance profile); nothing is configured here. S3-compatible
servers (MinIO, Ceph, a test server) are selected with the standard AWS variables `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, or per URI with pyarrow's query syntax (`s3://bucket/path?endpoint_override=host:port`).

Why writes are whole-or-nothing: a local file is written to a temporary name in the same folder, synced and
renamed; an object store makes an object visible only when its upload completes, and the bytes are sent in one
upload from memory, so a reader never sees a partial object. Callers write their index files (receipts, a
manifest) after the data they describe, so a reader that finds the index finds complete data.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def default_home() -> Path:
    """Where the embedded server keeps its SQLite file, artifacts and log: $FEWSOUND_HOME or ~/.fewsound."""
    return Path(os.environ.get("FEWSOUND_HOME", Path.home() / ".fewsound")).expanduser()


def storage_root(sub: str) -> str:
    """Where Ray Tune / Ray Train keep trial state and checkpoints: $FEWSOUND_STORAGE/sub (a shared folder or a
    cloud URI such as s3://bucket/fewsound/ray: multi-node runs need one that every node reaches), else
    $FEWSOUND_HOME/sub on this machine."""
    root = os.environ.get("FEWSOUND_STORAGE")
    if root:
        return f"{root.rstrip('/')}/{sub}"
    return str(default_home() / sub)


def is_uri(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (an object store or file:// URI), False for a plain path."""
    return bool(_SCHEME.match(str(location)))


def is_local(location: str | os.PathLike) -> bool:
    """True when `location` is on a filesystem of this machine (a plain path or file://)."""
    return not is_uri(location) or str(location).startswith("file://")


def normalize(location: str | os.PathLike) -> str:
    """The canonical text of a location: URIs as given (no trailing slash), plain paths absolute."""
    text = str(location)
    if is_uri(text):
        return text.rstrip("/") if not text.endswith("://") else text
    return str(Path(text).expanduser().resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` / parts..., keeping a URI's query (pyarrow options such as endpoint_override) at the end."""
    text = normalize(location)
    if not is_uri(text):
        return str(Path(text, *parts))
    base, sep, query = text.partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + (sep + query if sep else "")


def name(location: str | os.PathLike) -> str:
    """The last component of a location's path ("corpus" for s3://bucket/data/corpus)."""
    return normalize(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=32)
def _filesystem(root: str, endpoint: str | None, env_endpoint: str | None) -> pafs.FileSystem:
    """One filesystem object per bucket/root and endpoint (creating an S3 filesystem costs a region lookup over
    the network). env_endpoint (AWS_ENDPOINT_URL, which pyarrow reads itself) is part of the cache key only."""
    if endpoint is not None:  # AWS_ENDPOINT_URL_S3: the service-specific variable wins over AWS_ENDPOINT_URL
        return pafs.S3FileSystem(endpoint_override=endpoint, **_s3_query(urlsplit(root).query))
    return pafs.FileSystem.from_uri(root)[0]


def _s3_query(query: str) -> dict:
    return {k: v[-1] for k, v in parse_qs(query).items()}


def location(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a URI or plain path."""
    text = normalize(uri)
    if not is_uri(text):
        return pafs.LocalFileSystem(), text
    u = urlsplit(text)
    endpoint = None
    if u.scheme == "s3" and "endpoint_override" not in u.query:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or None
    root = f"{u.scheme}://{u.netloc}" + (f"?{u.query}" if u.query else "")
    fs = _filesystem(root, endpoint, os.environ.get("AWS_ENDPOINT_URL"))
    if u.scheme == "file":
        return fs, u.path
    return fs, f"{u.netloc}{u.path}".rstrip("/")


def exists(uri: str | os.PathLike) -> bool:
    fs, path = location(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str | os.PathLike) -> bool:
    """A folder, or (object stores have no folders) a prefix that holds at least one object."""
    fs, path = location(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return True
    return not is_local(uri) and bool(listdir(uri))


def size(uri: str | os.PathLike) -> int | None:
    """Bytes of a file/object, None when it does not exist."""
    fs, path = location(uri)
    info = fs.get_file_info(path)
    return None if info.type == pafs.FileType.NotFound else info.size


def listdir(uri: str | os.PathLike) -> list[str]:
    """Names of the files directly under a folder/prefix ([] when there is none)."""
    fs, path = location(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole file/object (FileNotFoundError when missing)."""
    fs, path = location(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a whole file/object atomically (see the module docstring). Creates local parent folders."""
    fs, path = location(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        return
    with fs.open_output_stream(path) as f:  # one upload from memory: the object appears when it completes
        f.write(data)


def upload_file(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local file to `uri` whole (read into memory first: the stores' single-upload guarantee)."""
    write_bytes(uri, Path(local).read_bytes())


def download_file(uri: str | os.PathLike, local: str | os.PathLike) -> None:
    """Copy `uri` to a local file atomically (a temp name next to it, then rename)."""
    fs, path = location(uri)
    dst = Path(local)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dst)


def delete(uri: str | os.PathLike) -> None:
    """Delete a file/object; a missing one is fine."""
    fs, path = location(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def sha256(uri: str | os.PathLike) -> str:
    """sha256 hex digest of a file/object, streamed (never held whole)."""
    fs, path = location(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_input_file(uri: str | os.PathLike):
    """A random-access reader (what Parquet needs to read one column or row group without the rest)."""
    fs, path = location(uri)
    return fs.open_input_file(path)
