"""Reading fewsound's own checkpoint files without ever running code from them.

Every file fewsound writes with torch.save (fit checkpoints, training checkpoints, model files) holds only tensors
and plain data (dicts, lists, tuples, numbers, strings, None). `load_weights_only` reads such a file with torch's
weights-only unpickler, so a file that someone replaced (e.g. in a shared bucket) with one carrying a pickled object
is refused before that object is built, and says so in one line naming the file, instead of torch's own multi-line
message (which suggests loading the file with weights_only=False).

    payload = load_weights_only(path, "cpu", what="fit checkpoint")
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from fewsound.errors import ConfigError

# torch's weights-only unpickler says this first when it refuses what a file holds, then the reason after _DETAIL
_REFUSED = "Weights only load failed"
_DETAIL = "WeightsUnpickler error:"


def load_weights_only(
    path: str | Path, map_location: torch.device | str = "cpu", *, what: str, unreadable: str | None = None
) -> Any:
    """torch.load(path, weights_only=True). ConfigError (one line, naming `path`): "refused: ..." for a file that
    holds a pickled object (never unpickled: no code runs), "`unreadable` (why)" for a truncated or foreign file.
    `what`: the kind of file in words ("fit checkpoint"); `unreadable` defaults to "unreadable `what`"."""
    unreadable = unreadable or f"unreadable {what}"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler refuses a global (a class or function to call: what runs code) by name;
        # anything else it refuses (an opcode it does not know: a foreign or garbled file) is an unreadable file
        detail = str(e).split(_DETAIL, 1)[-1].strip()
        found = re.search(r"GLOBAL ([\w.]+)", detail) if _REFUSED in str(e) else None
        if found is None:
            raise ConfigError(path, f"{unreadable} (UnpicklingError: {_first_line(detail)})") from None
        raise ConfigError(
            path,
            f"refused: it holds a pickled Python object ({found.group(1)}), which could run code when loaded; "
            f"fewsound's {what}s hold only tensors and plain data, so this file was not written by fewsound or was "
            "altered",
        ) from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is the user's input
        raise ConfigError(path, f"{unreadable} ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(text: object) -> str:
    return (str(text).strip().splitlines() or [""])[0]
