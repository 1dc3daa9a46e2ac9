"""The benchmark's rows and its preset: the methods, what trains each, the goal, and the checked preset TOML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedmeta.common.protocol import (
    ANIL, FAST_WEIGHTS, FEDAVG, FEDPROX, FOMAML, LSTM_OPTIMIZER, MAML, METASGD, PROTOTYPES, PROTOTYPES_CONTRASTIVE,
    REPTILE,
)
from fedmeta.simulations.experiments.presets import read_preset_toml

AUTO = "auto"  # fedmeta.common.step_selection.AUTO, without loading torch: the step count chosen from the support set

# RunConfig and the model factory load torch: method_configs imports them, so that `fedmeta benchmark --help`
# does not wait seconds for them.

DEFAULT_PRESET = "benchmark"
QUICK_PRESET = "benchmark-quick"

ORACLE = "oracle"  # the training key of the oracle row: trained per new site, not on the federation
INTENSITY = "intensity"  # the training key of the intensity baseline: fitted per new site on its k support slices
# The oracle's early stopping: validation scorings every ORACLE_EVAL_EVERY Adam steps, stop after
# ORACLE_PATIENCE without improvement (fedmeta.simulations.experiments.oracle; repeated here without torch).
ORACLE_EVAL_EVERY, ORACLE_PATIENCE = 25, 4


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: which training produced θ and whether the new site adapts it."""

    name: str
    training: str | None  # key of the preset's [training.<key>] table; None: never trained
    adapts: bool
    meaning: str
    # How the new site adapts θ and segments (fedmeta.common.adaptation_variants): a row that names another
    # variant reuses its training key's checkpoint, so two rows can score one θ adapted two ways.
    variant: str = "fine-tune"


METHODS = (
    Method("scratch", None, True, "random init (the federation's seeded start), fine-tuned on the new site only"),
    Method(FEDAVG, FEDAVG, False, "FedAvg global model used as is: no adaptation at any step count"),
    Method("fedavg-ft", FEDAVG, True, "the same FedAvg model, fine-tuned on the new site"),
    Method("fedprox-ft", FEDPROX, True, "FedProx global model, fine-tuned on the new site"),
    Method(FOMAML, FOMAML, True, "federated first-order MAML initialisation, fine-tuned"),
    Method(MAML, MAML, True, "federated second-order MAML initialisation, fine-tuned"),
    Method(REPTILE, REPTILE, True, "federated Reptile initialisation, fine-tuned"),
    Method(METASGD, METASGD, True, "federated Meta-SGD initialisation, fine-tuned with its learned step sizes"),
    Method(ANIL, ANIL, True, "federated ANIL initialisation, head fine-tuned"),
    Method(FAST_WEIGHTS, FAST_WEIGHTS, True,
           "federated fast-weight learner: head generated from the support set, then fine-tuned"),
    Method(PROTOTYPES, PROTOTYPES, True,
           "federated prototype learner: support prototypes (0 steps), then encoder fine-tuned"),
    Method(f"{PROTOTYPES}+frozen-prototypes", PROTOTYPES, True,
           "the same prototype learner's θ, its encoder fine-tuned under the frozen step-0 prototypes (the "
           "validation split's choice of test-time variant)", variant="frozen-prototypes"),
    Method(PROTOTYPES_CONTRASTIVE, PROTOTYPES_CONTRASTIVE, True,
           "the prototype learner trained with a contrastive margin loss on pixel pairs of its embedding"),
    Method(LSTM_OPTIMIZER, LSTM_OPTIMIZER, True,
           "federated UNet initialisation adapted by its federated learned LSTM optimiser"),
    Method("pooled-fomaml", "pooled-fomaml", True,
           "FOMAML on all training sites' pooled patients, no federation (centralised bound), fine-tuned"),
    Method("pooled-maml", "pooled-maml", True,
           "MAML on all training sites' pooled patients, no federation (centralised bound), fine-tuned"),
    Method("pooled-metasgd", "pooled-metasgd", True,
           "Meta-SGD on all training sites' pooled patients, no federation (centralised bound), fine-tuned"),
    Method(INTENSITY, INTENSITY, False, "per-site intensity thresholds fitted on the k support slices"),
    Method("oracle", ORACLE, False,
           "per new site, a UNet fully supervised on the site's own support patients (early-stopped on a quarter "
           "of them): the ceiling"),
)
METHODS_BY_NAME = {m.name: m for m in METHODS}
META_METHODS = (FOMAML, MAML, REPTILE, METASGD, ANIL, FAST_WEIGHTS, PROTOTYPES, LSTM_OPTIMIZER)
# The goal the benchmark checks (goal_check): at k = 5 and 10 steps, by a margin of Dice in every seed.
GOAL_SHOTS, GOAL_STEPS, GOAL_MARGIN = 5, 10, 0.03
PRESET_KEYS = {"federation", "federation-seed", "seeds", "shots", "steps", "auto-max-steps", "eval-max-images",
               "validation-sites", "methods", "run-config", "training", "oracle-steps", "oracle-eval-every",
               "oracle-patience", "curve-every", "jobs"}
SPECIAL_TRAINING = (None, ORACLE, INTENSITY)  # rows not trained on the federation: no [training.*] table


def load_benchmark_preset(preset: str) -> dict[str, Any]:
    """A benchmark preset (name in simulations/presets or a TOML path), checked key by key."""
    path, values = read_preset_toml(preset, kind="benchmark preset", known_glob="benchmark*.toml")
    unknown = sorted(set(values) - PRESET_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(PRESET_KEYS))}.")
    steps, auto = _steps(values.get("steps", [0, 1, 5, 10, 20]), path)
    spec = {
        "path": str(path),
        "name": path.stem,
        "federation": values.get("federation", "default"),
        "federation-seed": int(values.get("federation-seed", 0)),
        "seeds": int(values.get("seeds", 3)),
        "shots": [int(k) for k in values.get("shots", [1, 5, 10])],
        "steps": steps,  # the fixed counts, ints
        "auto-steps": auto,  # True: the count chosen from the support slices alone (the "auto" column) too
        "auto-max-steps": int(values.get("auto-max-steps", max(steps, default=0))),
        "eval-max-images": int(values.get("eval-max-images", 128)),
        "validation-sites": int(values.get("validation-sites", 0)),
        "oracle-steps": int(values.get("oracle-steps", 300)),  # the cap: the oracle stops early on its validation patients
        "oracle-eval-every": int(values.get("oracle-eval-every", ORACLE_EVAL_EVERY)),
        "oracle-patience": int(values.get("oracle-patience", ORACLE_PATIENCE)),
        "curve-every": int(values.get("curve-every", 0)),
        "jobs": int(values.get("jobs", 1)),
        "methods": list(values.get("methods", [m.name for m in METHODS])),
        "run-config": dict(values.get("run-config", {})),
        "training": {k: dict(v) for k, v in values.get("training", {}).items()},
    }
    _check_spec(spec, path)
    return spec


def _steps(values: Any, where: Any) -> tuple[list[int], bool]:
    """(sorted fixed step counts, whether "auto" is among them) from the preset's ``steps`` array."""
    if not isinstance(values, list):
        raise ValueError(f"{where}: steps={values!r} must be an array of step counts and \"auto\", e.g. [0, 5, 10, \"auto\"].")
    bad = [v for v in values if v != AUTO and (isinstance(v, bool) or not isinstance(v, int))]
    if bad:
        raise ValueError(f"{where}: steps {bad} are neither step counts (integers >= 0) nor \"auto\".")
    return sorted({int(v) for v in values if v != AUTO}), AUTO in values


def step_columns(spec: dict[str, Any]) -> list[int | str]:
    """The step columns a preset reports, as ``score_site`` takes them: the fixed counts, then "auto" if asked."""
    return list(spec["steps"]) + ([AUTO] if spec.get("auto-steps") else [])


def _check_spec(spec: dict[str, Any], where: Any) -> None:
    if spec["seeds"] < 1:
        raise ValueError(f"{where}: seeds={spec['seeds']} must be >= 1.")
    if not spec["shots"] or min(spec["shots"]) < 1:
        raise ValueError(f"{where}: shots={spec['shots']} must be a non-empty list of k >= 1.")
    if not spec["steps"] or min(spec["steps"]) < 0:
        raise ValueError(f"{where}: steps={spec['steps']} must hold at least one fixed step count, all >= 0 "
                         "(\"auto\" is reported beside them).")
    if spec["auto-max-steps"] < 0:
        raise ValueError(f"{where}: auto-max-steps={spec['auto-max-steps']} must be >= 0 (the most steps auto may choose).")
    if spec["eval-max-images"] < 0:
        raise ValueError(f"{where}: eval-max-images={spec['eval-max-images']} must be >= 0 (0 = every evaluation patient).")
    if spec["validation-sites"] < 0:
        raise ValueError(f"{where}: validation-sites={spec['validation-sites']} must be >= 0.")
    if spec["curve-every"] < 0:
        raise ValueError(f"{where}: curve-every={spec['curve-every']} must be >= 0 (0: no learning curves).")
    if spec["jobs"] < 1:
        raise ValueError(f"{where}: jobs={spec['jobs']} must be >= 1 (processes training and evaluating in parallel).")
    for key in ("oracle-steps", "oracle-eval-every", "oracle-patience"):
        if spec[key] < 1:
            raise ValueError(f"{where}: {key}={spec[key]} must be >= 1.")
    unknown = [m for m in spec["methods"] if m not in METHODS_BY_NAME]
    if unknown or not spec["methods"]:
        raise ValueError(f"{where}: methods {unknown or '[]'}: choose among {', '.join(METHODS_BY_NAME)}.")
    for method in spec["methods"]:
        key = METHODS_BY_NAME[method].training
        if key not in SPECIAL_TRAINING and key not in spec["training"]:
            raise ValueError(f"{where}: method {method} needs a [training.{key}] table (its inner-steps and the like).")


def method_configs(spec: dict[str, Any], methods: list[str]):
    """RunConfig per training key the methods need, with the shared run config under each table."""
    from fedmeta.common.config import RunConfig
    from fedmeta.common.model import unet_of

    configs = {}
    for method in methods:
        key = METHODS_BY_NAME[method].training
        if key in SPECIAL_TRAINING or key in configs:
            continue
        algorithm = key.removeprefix("pooled-")
        overrides = {**spec["run-config"], **spec["training"][key], "algorithm": algorithm, "eval-every": 0}
        try:
            configs[key] = RunConfig.from_run_config(overrides)
        except ValueError as err:
            raise ValueError(f"{spec['path']} [training.{key}]: {err}") from None
        if configs[key].adapt_variant != "fine-tune":  # the run config's would be stored, the row's scored
            raise ValueError(
                f"{spec['path']} [training.{key}]: adapt-variant = {configs[key].adapt_variant!r}: a benchmark row says "
                "how it adapts (its variant, e.g. the row prototypes+frozen-prototypes scores the prototype learner "
                "with frozen prototypes beside the row that fine-tunes it). Remove adapt-variant from the preset and "
                "--set, and choose rows with `methods`.")
    # The UNet each method starts from must be the same; the other families add their own parts to it.
    shapes = {key: (unet_of(c.model_config()), c.image_size, c.num_classes) for key, c in configs.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"{spec['path']}: [training.*] tables give different models or image sizes ({', '.join(sorted(shapes))}); "
            "the initialisations must be comparable, so set model-*, image-size and num-classes under [run-config] only."
        )
    return configs
