"""The hypernetwork half of the paper (Tables 2-6) as a catalogue of cells: one row of one table, with the model
it needs (kind, target network, encoder, size) and the dataset it is evaluated on. Ray-free: tune.hyper.grid
trains and evaluates the cells; fewsound.ablation is the INR half's catalogue.

    cells = paper_cells([2, 3, 4, 5, 6], ["VCTK", "LibriSpeech"])      # every row of every table asked for
"""

from __future__ import annotations

import dataclasses

from fewsound.errors import ConfigError

PAPER_DATASETS = ("VCTK", "noisy VCTK", "LibriSpeech", "LJ Speech", "GTZAN", "UrbanSound8K")
WHISPER_CHECKPOINTS = {"Whisper L": "large-v2", "Whisper T": "tiny.en"}  # Table 5's rows (the paper's text)
TABLE_ROW_HEADERS = {2: "Model", 3: "Target Network", 4: "Target Network", 5: "Encoder", 6: "Target Net."}
# --smoke-test: the paper's two hypernetwork sizes become two tiny ones (still distinct trainings)
SMOKE_PRESETS = {"17.5M": {"preset": "tiny"}, "41.2M": {"preset": "tiny", "hyper_widths": (96, 96)}}
SMOKE_TRAIN = dict(
    epochs=2,
    batch_size=4,
    samples_per_epoch=8,
    val_every=1,
    val_clips=4,
    log_clips=1,
    val_metrics=("mse", "psnr", "si_snr", "lsd"),
    lr=1e-4,
)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row of one paper table."""

    table: int
    label: str  # as the paper prints it
    kind: str
    target: str
    encoder: str
    preset: str  # the paper's size: "17.5M" | "41.2M"
    dataset: str
    group: str | None = None  # Table 6: the dataset's group
    whisper: str | None = None  # Table 5's Whisper rows: "large-v2" | "tiny.en"


def paper_cells(tables: list[int], datasets: list[str]) -> list[Cell]:
    """Every row of the asked tables. Tables 2-5 are on the first dataset (the paper's VCTK); Table 6 has a
    group per dataset."""
    bad = [t for t in tables if t not in (2, 3, 4, 5, 6)]
    if bad or not tables:
        raise ConfigError("--tables", f"the hypernetwork tables are 2-6, got {tables}")
    if not datasets:
        raise ConfigError("--datasets", "give at least one dataset")
    main = datasets[0]
    cells: list[Cell] = []
    targets = ("nerf", "kan", "siren")
    for t in tables:
        if t == 2:
            cells += [
                Cell(2, "HyperSound", "hypersound", "nerf", "soundstream", "17.5M", main),
                Cell(2, "FewSound 17.5M", "fewsound", "nerf", "soundstream", "17.5M", main),
                Cell(2, "FewSound 41.2M", "fewsound", "nerf", "soundstream", "41.2M", main),
            ]
        elif t in (3, 4):
            kind = "fewsound" if t == 3 else "hypersound"
            cells += [Cell(t, x.upper(), kind, x, "soundstream", "17.5M", main) for x in targets]
        elif t == 5:
            for label, encoder in (
                ("SoundStream", "soundstream"),
                ("Whisper L", "whisper"),
                ("Whisper T", "whisper"),
                ("Spectral", "spectral"),
                ("SNAC", "snac"),
            ):
                cells.append(
                    Cell(5, label, "fewsound", "nerf", encoder, "17.5M", main, None, WHISPER_CHECKPOINTS.get(label))
                )
        else:
            cells += [
                Cell(6, x.upper(), "fewsound", x, "soundstream", "41.2M", ds, group=ds)
                for ds in datasets
                for x in ("nerf", "kan")
            ]
    return cells


def cells_text(cells: list[Cell]) -> str:
    return "; ".join(f"Table {c.table}: {c.label}" + (f" ({c.group})" if c.group else "") for c in cells)


def parse_datasets(text: str | None, smoke: bool) -> dict[str, str | None]:
    """--datasets "NAME=CORPUS,..." -> {name: corpus folder}; None: the built-in corpus under the name "builtin"
    (in a smoke test: under every name of Table 6, so that its shape is complete)."""
    if not text:
        return {name: None for name in PAPER_DATASETS} if smoke else {"builtin": None}
    out: dict[str, str | None] = {}
    for item in text.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError("--datasets", f"expected NAME=CORPUS (e.g. VCTK=/data/vctk-fs), got {item!r}")
        out[name.strip()] = None if path.strip() == "builtin" else path.strip()
    return out
