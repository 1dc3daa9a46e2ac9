"""What every importer of a downloaded dataset shares: the site folder it writes and the summary it reports.

An importer (``fedmeta.common.import_msd``, ``fedmeta.common.import_chaos``) writes the layout
``fedmeta.common.site_layout`` reads — ``dataset.json`` with ``labels`` (value -> name), ``modality`` (channel
index -> name) and a ``training`` list of ``{"image", "label"}`` pairs, images in ``imagesTr/``, label maps in
``labelsTr/``, unlabelled images in ``imagesTs/`` (listed under ``test``: for prediction, never training) — and
``import-summary.json`` beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUMMARY_FILE = "import-summary.json"


@dataclass
class ImportSummary:
    """What an import wrote and what it left out: ``skipped`` maps a source file to the reason."""

    source: str
    site: str
    cases: int = 0
    test_images: int = 0
    channels: dict[str, str] = field(default_factory=dict)  # index -> name, in the image's channel order
    labels: dict[str, str] = field(default_factory=dict)  # value -> name
    skipped: dict[str, str] = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"imported {self.source} -> {self.site}",
                 f"  cases: {self.cases} labelled (imagesTr/labelsTr), {self.test_images} unlabelled (imagesTs, for "
                 "prediction only)",
                 "  channels: " + ", ".join(f"{k}={v}" for k, v in self.channels.items()),
                 "  labels: " + ", ".join(f"{k}={v}" for k, v in self.labels.items()),
                 f"  skipped: {len(self.skipped)} file(s)"]
        lines += [f"    {name}: {why}" for name, why in sorted(self.skipped.items())]
        return "\n".join(lines)


def prepare_site_folder(out: Path) -> Path:
    """``out`` as an empty site folder with ``imagesTr/`` and ``labelsTr/``; a ValueError where it holds files
    already (an import never mixes with, or overwrites, another site's data)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder; an import writes a new site folder and "
                         "never overwrites one. Fix: give a new path, or remove the old import first.")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    return out


def write_site_json(out: Path, *, name: str, description: str, channels: dict[str, str], labels: dict[str, str],
                    training: list[dict[str, str]], test: list[str], extra: dict | None = None) -> None:
    """The site's ``dataset.json`` (MSD keys, with nnU-Net v2's ``channel_names`` beside ``modality`` so that
    either reader finds the channel order) and nothing else."""
    meta = {"name": name, "description": description,
            "tensorImageSize": "4D" if len(channels) > 1 else "3D",
            "modality": channels, "channel_names": channels, "labels": labels,
            "numTraining": len(training), "numTest": len(test), "training": training, "test": test,
            **(extra or {})}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def write_summary(out: Path, summary: ImportSummary) -> None:
    (out / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")


__all__ = ["ImportSummary", "SUMMARY_FILE", "prepare_site_folder", "write_site_json", "write_summary"]
