"""Atomic checkpoints of the federation's state after every round, and resuming from them.

A checkpoint holds everything the next round depends on: θ, Meta-SGD step sizes, the
meta-optimiser's moments, the round just finished, the server's RNG state and the hash of the
run config that produced it. Written to a temporary file and moved into place with ``os.replace``,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
# 2: adds ``privacy`` (the DP accountant's history). A format-1 file (no privacy field) still loads; a
# fedmeta that knows only format 1 refuses a format-2 file by its number instead of failing on the field.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


@dataclass
class Checkpoint:
    round: int
    params: dict[str, torch.Tensor]
    step_sizes: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    rng_state: dict[str, Any]
    config_hash: str
    run_config: dict[str, Any]
    counters: dict[str, int] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None  # DP runs: the accountant's state (delta and every round's release)


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Writes ``checkpoint`` to ``path`` atomically (temp file in the same folder, fsync, replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, **checkpoint.__dict__}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> Checkpoint:
    """Reads a checkpoint written by :func:`save_checkpoint`; a clear error for anything else."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise ValueError(
            f"{path}: not a readable fedmeta checkpoint ({type(err).__name__}: {err}); "
            "delete it to start afresh or point out-dir at another run."
        ) from err
    if isinstance(payload, dict) and payload.get("format") == "fedmeta-site-model":
        raise ValueError(f"{path}: a site model written by fedmeta adapt, not a consortium checkpoint; segment with it: "
                         f"fedmeta predict --model {path.parent}.")
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"{path}: checkpoint format {payload.get('format') if isinstance(payload, dict) else '?'} "
            f"is not one this fedmeta reads ({', '.join(map(str, READABLE_FORMATS))}); it was written by another "
            "fedmeta version. Use that version, or start a new run."
        )
    payload.pop("format")
    known = {f.name for f in fields(Checkpoint)}
    required = {f.name for f in fields(Checkpoint) if f.default is MISSING and f.default_factory is MISSING}
    missing, unknown = sorted(required - set(payload)), sorted(set(payload) - known)
    if missing or unknown:
        raise ValueError(
            f"{path}: not a complete fedmeta checkpoint ("
            + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}", unknown and f"unknown {', '.join(unknown)}"]))
            + "); it was damaged or written by another program. Point at the checkpoint.pt a fedmeta run wrote."
        )
    checkpoint = Checkpoint(**payload)
    check_weights(path, {"params": checkpoint.params, "step_sizes": checkpoint.step_sizes or {}})
    return checkpoint


# No trained UNet weight (or Meta-SGD step size) comes near this; a value beyond it is a damaged or
# hostile file, which would give a Dice of 0 with exit code 0 rather than an error.
PLAUSIBLE_WEIGHT = 1e6


def check_weights(path: Path, groups: dict[str, Any]) -> None:
    """Refuses weights (``{"params": θ, "step_sizes": ...}``, each a name -> tensor mapping) that are not tensors,
    not float32, hold NaN/Inf, or are implausibly large, naming ``path`` and the tensor. Every loader of
    weights calls it."""
    for group, tensors in groups.items():
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"{path}: its {group} are not a mapping of tensors; it was damaged or written by another "
                             "program. Point at the checkpoint.pt a fedmeta run wrote.")
        for name, tensor in tensors.items():
            if tensor.dtype != torch.float32:  # an integer θ takes no gradient step; float64 or half, no float32 input
                raise ValueError(f"{path}: {group} {name!r} holds {str(tensor.dtype).removeprefix('torch.')} values, "
                                 "not float32 as every weight fedmeta trains is; the file was damaged or written by "
                                 "another program. Use the checkpoint.pt a fedmeta run wrote.")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{path}: {group} {name!r} holds NaN or Inf; this θ is broken and would segment "
                                 "nothing. Use an earlier checkpoint of the run, or ask the consortium for the release.")
            largest = float(tensor.abs().max()) if tensor.numel() else 0.0
            if largest > PLAUSIBLE_WEIGHT:
                raise ValueError(f"{path}: {group} {name!r} holds a value of magnitude {largest:.3g}, beyond any "
                                 f"trained weight ({PLAUSIBLE_WEIGHT:g}); the file is damaged or was tampered with. "
                                 "Use an earlier checkpoint, or ask the consortium for the release.")


def trajectory_hash(config) -> str:
    """The hash a checkpoint of ``config``'s run carries: its run config's trajectory hash, plus what
    the simulated federation holds when ``federation-dir`` names one (the same data, wherever it lies)."""
    if not config.federation_dir:
        return config.trajectory_hash()
    from fedmeta.common.synth import federation_digest

    return config.trajectory_hash(federation=federation_digest(config.federation_dir))


__all__ = ["CHECKPOINT_NAME", "Checkpoint", "check_weights", "load_checkpoint", "save_checkpoint", "trajectory_hash"]
