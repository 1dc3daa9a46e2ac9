"""Presets: TOML files of run-config overrides (``simulations/presets/``), and ``--set KEY=VALUE``.

``fedmeta simulate`` reads a preset as run-config keys plus the driver keys ``federation`` and
``federation-seed``, and per-algorithm ``[training.<algorithm>]`` tables; ``fedmeta benchmark`` reads its own
richer presets (``benchmark*.toml``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
# Keys of a simulate preset that configure the driver rather than the Flower run.
DRIVER_KEYS = ("federation", "federation-seed", "oracle-steps")
DEFAULT_ORACLE_STEPS = 300  # Adam steps of each held-out site's oracle (the ceiling in the report)


def read_preset_toml(preset: str, *, kind: str = "preset", known_glob: str = "*.toml") -> tuple[Path, dict[str, Any]]:
    """A preset by name (a TOML file in simulations/presets) or by path: its path and its values."""
    path = Path(preset)
    if not path.suffix:
        path = PRESETS_DIR / f"{preset}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob(known_glob) if kind != "preset" or not p.stem.startswith("benchmark")))
        raise ValueError(f"{kind} {preset!r}: no file {path}; use one of {known} or a path to a TOML file.")
    try:
        return path, tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err}).") from None


def load_preset(preset: str, algorithm: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-config overrides, driver settings) from a preset name or a TOML file path.

    A preset's ``[training.<algorithm>]`` table holds the settings one algorithm trains with (the prototype
    learner takes no inner step: `smoke`); the overrides include the table of ``algorithm``, default the
    preset's own ``algorithm``, so a run of another algorithm gets none of another's settings.
    """
    path, values = read_preset_toml(preset)
    tables = values.pop("training", {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ValueError(f"{path}: [training.<algorithm>] entries must be tables of run-config keys, e.g. "
                         "[training.prototypes] inner-steps = 0.")
    _check_training_tables(path, tables)
    driver = {k: values.pop(k) for k in DRIVER_KEYS if k in values}
    driver.setdefault("federation", path.stem if path.stem in ("smoke", "default") else "default")
    driver.setdefault("federation-seed", 0)
    driver.setdefault("oracle-steps", DEFAULT_ORACLE_STEPS)
    if isinstance(driver["oracle-steps"], bool) or not isinstance(driver["oracle-steps"], int) or driver["oracle-steps"] < 0:
        raise ValueError(f"{path}: oracle-steps={driver['oracle-steps']!r} must be an integer >= 0 (0: no oracle).")
    values.update(tables.get(algorithm or values.get("algorithm"), {}))
    return values, driver


def _check_training_tables(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    """Each ``[training.<algorithm>]`` table names an algorithm and holds run-config keys only: a misspelt
    algorithm would be skipped silently, a misspelt key reported without the file it is in."""
    from fedmeta.common.config import RunConfig  # torch: only once a preset is read, never for --help
    from fedmeta.common.protocol import ALGORITHMS

    keys = {f.replace("_", "-") for f in RunConfig.__dataclass_fields__}
    for algorithm, table in tables.items():
        if algorithm not in ALGORITHMS:
            raise ValueError(f"{path}: [training.{algorithm}]: no algorithm is called {algorithm!r}; name one of "
                             f"{', '.join(ALGORITHMS)}, or remove the table.")
        unknown = sorted(set(table) - keys)
        if unknown:
            where = [k for k in unknown if k in DRIVER_KEYS]
            hint = (f" ({', '.join(where)} configure{'s' if len(where) == 1 else ''} the driver: put "
                    f"{'it' if len(where) == 1 else 'them'} at the top of the file)") if where else ""
            raise ValueError(f"{path}: [training.{algorithm}]: unknown run-config key(s) {', '.join(unknown)}{hint}; "
                             f"valid keys: {', '.join(sorted(keys))}.")
        if "algorithm" in table:
            raise ValueError(f"{path}: [training.{algorithm}] sets algorithm: the table applies when {algorithm} is "
                             "the algorithm run; set algorithm at the top of the file or with --algorithm.")


def parse_sets(items: list[str], command: str = "simulate") -> dict[str, Any]:
    """``--set KEY=VALUE`` options as a dict of strings (RunConfig coerces each to its key's type)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            from fedmeta.common.config_sections import shown  # only on this error: the module loads the learners

            raise SystemExit(f"fedmeta {command}: --set {shown(item)} must look like KEY=VALUE, e.g. --set inner-lr=0.1")
        values[key.strip()] = raw.strip()  # RunConfig coerces strings to each key's type
    return values


__all__ = ["DRIVER_KEYS", "PRESETS_DIR", "load_preset", "parse_sets", "read_preset_toml"]
