"""Training state on disk: model, optimizer and schedule as tensors and plain data only, read with torch's
weights-only unpickler (a file carrying a pickled object is refused: it could run code), and its digest."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from fewsound.config import to_dict
from fewsound.errors import ConfigError
from fewsound.safe_load import load_weights_only
from fewsound.train.config import TrainConfig, train_config_from_dict
from fewsound.train.step import unwrap

STATE_FILE = "train_state.pt"
STATE_FORMAT = "fewsound.train_state"
META_FILE = "meta.json"


def state_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> str:
    """sha256 of every tensor of the model and the optimizer and of the scheduler's state: two processes hold
    the same training state iff their digests are equal (the resume test compares them)."""
    h = hashlib.sha256()
    for k, v in sorted(unwrap(model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    opt = optimizer.state_dict()
    for pid in sorted(opt["state"]):
        for k, v in sorted(opt["state"][pid].items()):
            h.update(f"{pid}.{k}".encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    h.update(json.dumps([g["lr"] for g in opt["param_groups"]]).encode())
    h.update(
        json.dumps(
            {k: v for k, v in scheduler.state_dict().items() if isinstance(v, (int, float, str))}, sort_keys=True
        ).encode()
    )
    return h.hexdigest()


def save_training_state(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    *,
    epoch: int,
    step: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the state after 0-based `epoch` (model, optimizer, scheduler) to `folder`/train_state.pt and a
    readable `folder`/meta.json (epoch, step, digest, config). Returns the meta dict.

    train_state.pt holds only tensors and plain data (dicts, lists, tuples, numbers, strings, None): what
    torch.load(weights_only=True) accepts, so loading it never runs code. The data stream's randomness is no
    state to save: a resumed run derives it from (seed, rank, epoch)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = unwrap(model)
    payload = {
        "format": STATE_FORMAT,
        "model": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
    }
    _assert_plain(payload, "train_state")
    buf = io.BytesIO()
    torch.save(payload, buf)
    (folder / STATE_FILE).write_bytes(buf.getvalue())
    meta = {
        "epoch": epoch,
        "step": step,
        "digest": state_digest(model, optimizer, scheduler),
        "config": to_dict(cfg),
        **(extra or {}),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def _assert_plain(obj: Any, where: str) -> None:
    """Every leaf of `obj` is a tensor or plain data: a checkpoint that weights_only=True can load (a torch
    upgrade that put an object into an optimizer's or scheduler's state would fail here, when saving)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_plain(k, where)
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{where}[{i}]")
    elif not (obj is None or torch.is_tensor(obj) or isinstance(obj, (bool, int, float, str))):
        raise TypeError(f"{where} is a {type(obj).__name__}: a training checkpoint holds tensors and plain data only")


def load_state_file(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """The payload of a train_state.pt, read with torch's weights-only unpickler: tensors and plain data only,
    never an object whose unpickling would run code. ConfigError (one line, naming the file) for a file that
    holds anything else or is unreadable. Checkpoints of every fewsound release load (they always held only
    tensors and plain data; the "format" tag is new)."""
    payload = load_weights_only(path, map_location, what="training checkpoint")
    if not isinstance(payload, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= payload.keys():
        raise ConfigError(path, "not a fewsound training checkpoint (no model/optimizer/scheduler/epoch)")
    if payload.get("format", STATE_FORMAT) != STATE_FORMAT:
        raise ConfigError(path, f"not a fewsound training checkpoint (format {payload['format']!r})")
    return payload


def load_training_state(
    folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore what `save_training_state` wrote into model/optimizer/scheduler (built from the same config, the
    model already on its device). Returns the meta dict, with "digest_loaded" = the digest of the restored state.

    The file is read to the host; the load_state_dict calls then copy each tensor where it belongs, and the
    optimizer's state ends as a fresh optimizer's after a step: AdamW's moments on their parameter's device and
    dtype (torch casts them), its `step` a 0-dim float32 CPU tensor (torch keeps a non-fused, non-capturable
    `step` where it was read, and a fresh AdamW hosts it on the CPU). Reading onto a GPU instead
    (map_location=cuda) would leave `step` there, and AdamW reads it back with `.item()` every step: a host sync
    per parameter per step."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    payload = load_state_file(folder / STATE_FILE, map_location="cpu")
    unwrap(model).load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    unwrap(model).set_epoch(int(payload["epoch"]) + 1)
    meta["digest_loaded"] = state_digest(model, optimizer, scheduler)
    return meta


def model_from_training_state(folder: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of a training checkpoint folder (train_state.pt + meta.json), in eval mode."""
    from fewsound.hyper import build_model

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file() or not (folder / META_FILE).is_file():
        raise ConfigError(folder, f"not a training checkpoint (no {STATE_FILE} and {META_FILE})")
    cfg = train_config_from_dict(json.loads((folder / META_FILE).read_text())["config"])
    model = build_model(cfg.model, verbose=False)
    payload = load_state_file(folder / STATE_FILE, map_location=map_location)
    model.load_state_dict(payload["model"])
    model.set_epoch(int(payload["epoch"]) + 1)
    return model.to(map_location).eval()
