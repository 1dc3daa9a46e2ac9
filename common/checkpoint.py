"""Atomic checkpoints of the federation's state after every round, and resuming from them.

A checkpoint holds everything the next round depends on: θ, Meta-SGD step sizes, the
meta-optimiser's moments, the round just finished, the server's RNG state and the hash of the
run config that produced it. Written to a temporary file and moved into place with ``os.replace``,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fedmeta.common.outputs import PRIVATE_FILE_MODE, write_atomically

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
    """Writes ``checkpoint`` to ``path`` atomically (:func:`fedmeta.common.outputs.write_atomically`: a new temp
    file in the same folder, fsync, rename), readable by its owner only whatever the umask (it holds the run's θ)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, **checkpoint.__dict__}
    write_atomically(path, lambda tmp: torch.save(payload, tmp), mode=PRIVATE_FILE_MODE)


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
    check_fields(path, payload)
    checkpoint = Checkpoint(**payload)
    check_weights(path, {"params": checkpoint.params, "step_sizes": checkpoint.step_sizes or {}})
    return checkpoint


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _privacy_problem(privacy: Any) -> str | None:
    """What is wrong with a stored DP accountant (``PrivacyAccountant.state_dict``: a delta and one
    ``[population, sampled, noise multiplier]`` per round), or None."""
    if privacy is None:
        return None
    if not isinstance(privacy, dict) or set(privacy) != {"delta", "history"}:
        return f"is {_shown(privacy)}, not the DP accountant's {{'delta': ..., 'history': [...]}}"
    delta, history = privacy["delta"], privacy["history"]
    if not (_is_number(delta) and 0 < delta < 1):
        return f"'delta' is {_shown(delta)}, not a number in (0, 1)"
    if not isinstance(history, list):
        return f"'history' is {_shown(history)}, not a list of rounds"
    for index, event in enumerate(history):
        if not (isinstance(event, (list, tuple)) and len(event) == 3 and _is_int(event[0]) and _is_int(event[1])
                and 1 <= event[1] <= event[0] and _is_number(event[2]) and event[2] > 0):
            return (f"'history'[{index}] is {_shown(event)}, not [sites, sampled sites, noise multiplier] "
                    "(whole numbers 1 <= sampled <= sites, a multiplier > 0)")
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(path: Path, payload: dict[str, Any]) -> None:
    """Refuses a checkpoint whose fields besides the weights are not of the kinds fedmeta writes, naming ``path``
    and the field: a round that is not a whole number, a run config that is not a mapping of text keys, a DP
    accountant that is not one. A resumed run, a release and an adaptation all read these; a wrong kind would
    otherwise fail far from the file (``invalid literal for int()``) or, worse, be used."""
    problems = []
    if not (_is_int(payload.get("round")) and payload["round"] >= 0):
        problems.append(f"'round' is {_shown(payload.get('round'))}, not a whole number of rounds >= 0")
    run_config = payload.get("run_config")
    if not isinstance(run_config, dict):
        problems.append(f"'run_config' is a {type(run_config).__name__}, not a mapping of run-config keys to values")
    elif keys := [key for key in run_config if not isinstance(key, str)]:
        problems.append(f"'run_config' has key(s) {', '.join(map(_shown, keys[:5]))} that are not text")
    if not isinstance(payload.get("config_hash"), str):
        problems.append(f"'config_hash' is {_shown(payload.get('config_hash'))}, not text")
    for name in ("optimizer", "rng_state"):
        if not isinstance(payload.get(name), dict):
            problems.append(f"'{name}' is a {type(payload.get(name)).__name__}, not a mapping")
    counters = payload.get("counters", {})
    if not (isinstance(counters, dict) and all(isinstance(k, str) and _is_int(v) for k, v in counters.items())):
        problems.append(f"'counters' is {_shown(counters)}, not a mapping of names to whole numbers")
    if problem := _privacy_problem(payload.get("privacy")):
        problems.append(f"'privacy' {problem}")
    if problems:
        raise ValueError(f"{path}: not a checkpoint fedmeta wrote: {'; '.join(problems)}. The file was damaged or "
                         "tampered with; use the checkpoint.pt a fedmeta run wrote (or the consortium's release).")


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
    # fedmeta.common.synth: +11 ms (6 modules) on the ClientApp's and ServerApp's import (python -X importtime);
    # only a simulated federation (federation-dir) has a digest.
    from fedmeta.common.synth import federation_digest

    return config.trajectory_hash(federation=federation_digest(config.federation_dir))


__all__ = ["CHECKPOINT_NAME", "Checkpoint", "check_fields", "check_weights", "load_checkpoint", "save_checkpoint", "trajectory_hash"]
