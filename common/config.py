"""The run configuration: Flower's flat kebab-case ``run_config`` parsed once into a frozen dataclass.

Defaults live in one place, ``[tool.flwr.app.config]`` of pyproject.toml; this module only knows the keys, their
types and what values are legal. Both apps call :meth:`RunConfig.from_run_config` at their edge and pass the
dataclass inward, so inner code never reads strings.

Configuration by concern: each key is declared once, in the frozen dataclass of its section
(:mod:`fedmeta.common.config_sections`: :class:`Training`, :class:`InnerLoop`, :class:`Learners`, :class:`Model`,
:class:`Evaluation`, :class:`Runtime`, :class:`Liveness`, :class:`Privacy`, :class:`Robustness`,
:class:`SecureAggregation`), which checks its own keys and declares beside each whether it joins
:meth:`RunConfig.trajectory_hash`. RunConfig inherits from every section, so dataclasses collects their fields into
one flat frozen dataclass: ``RunConfig(inner_lr=0.1)``, ``config.inner_lr``, ``asdict``, ``fields``, equality and
hashing stay a plain dataclass's, and the flat wire format needs no translation. (Sections held as nested fields
would need a hand-written flat ``__init__``, a forwarding ``__getattr__`` and a flattening ``asdict``: three more
places to forget a key.) ``config.privacy``, ``config.training`` and the like give one section as its own
dataclass. This module adds what joins sections: the order of all checks, the checks across sections, what differs
by algorithm (:func:`_algorithm_checks` and the helpers beside it), values derived from several sections, and the
parsing of the wire format.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from fedmeta.common.config_sections import (  # the limits and choices are re-exported: callers read them here
    DEVICES, INNER_STEPS_FLOOR, MAX_BASE_CHANNELS, MAX_EPISODES, MAX_EVAL_BATCH, MAX_IMAGE_SIZE, MAX_LEARNER_SIZE,
    MAX_MODEL_LEVELS, MAX_PARAMETERS, MAX_RES_UNITS, MAX_SHOTS, MAX_STEPS, META_OPTIMIZERS, NEVER, SPACING_MM_RANGE,
    STEP_SIZES, Evaluation, InnerLoop, Learners, Liveness, Model, Privacy, Robustness, Runtime, SecureAggregation,
    Training, hash_rule, need, shown,
)
from fedmeta.common.algorithms import ALGORITHMS as ALGORITHM_OBJECTS
from fedmeta.common.algorithms import Algorithm
from fedmeta.common.model import ModelConfig, build_model, parameter_count
from fedmeta.common.protocol import ALGORITHMS


class _SectionView:
    """``config.<section>``: the section's keys of a run config, as the section's own frozen dataclass."""

    def __init__(self, section: type) -> None:
        self.section = section

    def __get__(self, config: Any, owner: type | None = None) -> Any:
        if config is None:
            return self
        return self.section(**{f.name: getattr(config, f.name) for f in fields(self.section)})


@functools.lru_cache(maxsize=16)
def _site_variants(algorithm: str, model: ModelConfig) -> tuple[str, ...]:
    """The adaptation variants a site model of this run can be adapted with: those that apply to the algorithm and
    to its network (a variant can need parts of it, e.g. norm parameters) and whose adapted weights segment alone.
    Cached: a RunConfig is checked again on every replace(), and this builds the network."""
    from fedmeta.common.adaptation_variants import VARIANTS, Variant  # imports the algorithms' inner loops: only here

    network = build_model(model)
    return tuple(name for name, v in VARIANTS.items()
                 if type(v).logits is Variant.logits and v.applies_to(algorithm) and v.applies_to(network))


# dataclasses collects a class's fields from its last base first: the sections are listed last to first, so the
# fields (and to_run_config) run from algorithm to release-key.
@dataclass(frozen=True)
class RunConfig(Runtime, SecureAggregation, Robustness, Privacy, Liveness, Evaluation, Model, Learners, InnerLoop,
                Training):
    """Every knob of a fedmeta run. Field ``inner_lr`` is key ``inner-lr`` on the wire; its section is
    ``config.inner_loop``."""

    def __post_init__(self) -> None:
        # Each section its own keys, then the rules joining sections: a key's own rule is reported before them.
        for section in (Training, InnerLoop, Learners):
            section._check(self)
        for holds, key, problem in self.algorithm_object.config_rules(self):  # what the algorithm allows of the others
            need(self, holds, key, problem)
        for section in (Model, Evaluation, Liveness, Privacy, Robustness, SecureAggregation, Runtime):
            section._check(self)
        self._check_across_sections()
        self._check_network()
        self._check_adapt_variant()

    def _check_across_sections(self) -> None:
        """Privacy against robustness and weighting; secure aggregation against all three and min-sites."""
        need(self, self.dp == "none" or self.aggregation == "mean", "aggregation",
             f"differential privacy (dp={self.dp!r}) calibrates its noise to the mean of clipped replies; "
             "use aggregation='mean' with dp (clipping already bounds each site's influence).")
        need(self, self.dp == "none" or self.site_weighting != "data", "site-weighting",
             "differential privacy needs every site to weigh the same (a data-size weight changes the "
             "sensitivity); use site-weighting='per-site' or 'auto' with dp.")
        secure = self.secure_aggregation != "none"
        need(self, not secure or self.aggregation == "mean", "aggregation",
             "secure aggregation reveals only the sum, so a rule that looks at single replies cannot run on it; "
             "use aggregation='mean' with secure-aggregation (bound replies with DP clipping instead).")
        need(self, not secure or self.dp != "central", "dp",
             "central DP clips each reply at the server, which secure aggregation never shows it; use dp='local' "
             "(each site clips and adds its share of the noise) with secure-aggregation.")
        need(self, self.dp != "local" or secure, "dp",
             "local DP splits the noise over the round's sites (sigma*C/sqrt(m) each), so one reply alone carries "
             "too little noise for the guarantee: the server must see only the sum. Set secure-aggregation="
             "'secagg+' with dp='local', or use dp='central' (a trusted server adds the noise).")
        need(self, not secure or not self.max_update_norm, "max-update-norm",
             "secure aggregation never shows the server a single reply, so it cannot measure one's norm; set "
             "max-update-norm=0 and bound replies with dp='local' clipping (and secagg-clip-range).")
        need(self, not secure or self.site_weighting != "data", "site-weighting",
             "secure aggregation sums unweighted replies; use site-weighting='per-site' or 'auto'.")
        # A sparse graph lets a server that withholds shares cut the answered sites into pieces of k + 1 and
        # unmask each alone; sites refuse pieces smaller than min-sites (and than the local DP split).
        sparse = secure and self.secagg_neighbours
        need(self, not sparse or self.secagg_neighbours + 1 >= max(2, self.min_sites),
             "secagg-neighbours", f"with min-sites={self.min_sites}, a sparse graph needs at least "
             f"{max(2, self.min_sites) - 1} neighbours per site (or 0: every other site), or no sum could be unmasked.")
        need(self, not sparse or self.dp != "local", "secagg-neighbours",
             "dp='local' splits the noise over the round's quorum, which a sparse graph's pieces may be smaller "
             "than; use secagg-neighbours=0 (every other site) with dp='local'.")
        if secure and self.dp == "local":  # the largest per-site noise: split over the fewest replies allowed
            reach = self.dp_clip_norm * (1 + 6 * self.dp_noise_multiplier / math.sqrt(max(1, self.min_sites)))
            need(self, self.secagg_clip_range >= reach, "secagg-clip-range",
                 f"the quantiser clips each element to +-{self.secagg_clip_range:g} after the local DP noise is added; "
                 f"with dp-clip-norm={self.dp_clip_norm:g} and dp-noise-multiplier={self.dp_noise_multiplier:g} it "
                 f"must be at least C + 6 sd = {reach:.3g}, or it cuts the noise the accountant books.")

    def _check_adapt_variant(self) -> None:
        # A site model holds one set of adapted weights (an ensemble predicts from two), and the variant must apply
        # to what this run trains (frozen prototypes need a prototype learner); said before any round runs.
        if self.adapt_variant == "fine-tune":  # fedmeta.common.adaptation_variants.DEFAULT: applies to every network
            return
        usable = _site_variants(self.algorithm, self.model_config())
        need(self, self.adapt_variant in usable, "adapt-variant",
             f"must be an adaptation variant that applies to algorithm {self.algorithm!r} with this network "
             f"(model-norm={self.model_norm!r}) and whose adapted weights segment alone: one of {', '.join(usable)}.")

    def _check_network(self) -> None:
        # Model validation (norm, widths) belongs to ModelConfig; surface its message with the key.
        try:
            model = self.model_config()
        except ValueError as err:
            raise ValueError(f"run config model-*: {err}") from None
        count = parameter_count(model)  # counted without allocating: before any caller builds the network
        need(self, count <= MAX_PARAMETERS, "model-base-channels",
             f"with model-levels={self.model_levels} and model-res-units={self.model_res_units} the network has "
             f"{count:,} parameters ({count * 4 / 2**30:.1f} GiB as float32), more than the {MAX_PARAMETERS:,} "
             "fedmeta builds; use fewer channels or levels.")

    @property
    def algorithm_object(self) -> Algorithm:
        """The registered algorithm this run trains with (``fedmeta.common.algorithms``)."""
        return ALGORITHM_OBJECTS[self.algorithm]

    # One section of the run config as its own frozen dataclass: config.privacy.dp_clip_norm.
    training = _SectionView(Training)
    inner_loop = _SectionView(InnerLoop)
    learners = _SectionView(Learners)
    model = _SectionView(Model)
    evaluation = _SectionView(Evaluation)
    runtime = _SectionView(Runtime)
    liveness = _SectionView(Liveness)
    privacy = _SectionView(Privacy)
    robustness = _SectionView(Robustness)
    secagg = _SectionView(SecureAggregation)  # its mode is the key secure_aggregation

    def memory_estimate(self) -> int:
        """Bytes one site needs for a round, an adaptation or a segmentation with this config, about: the weights
        and their adaptation copies (θ, adapted, gradients, optimiser moments: 8 per weight); the round's episodes,
        which ``fedmeta.common.federated_round.site_update`` holds all at once (episodes-per-site x (k-shot +
        q-query) slices: the image, its int64 label and its one-hot target); and the network's activations for the
        largest pass (measured on the UNet: ~11 top-level feature maps per slice backward, ~4 forward) — an
        episode's backward pass (FOMAML batches 4 or more episodes into one), an evaluation support set's, or an
        evaluation batch's forward pass. A pooled (centralised) run holds every site's episodes: this is per site."""
        pixels = self.image_size**2
        feature_map = self.model_base_channels * pixels * 4
        episode_slices = self.k_shot + self.q_query
        episodes = self.episodes_per_site * episode_slices * pixels * (4 + 8 + 4 * self.num_classes)
        at_once = self.algorithm_object.episodes_at_once(self.episodes_per_site)
        activations = max(12 * episode_slices * at_once, 12 * self.eval_k_shot, 4 * self.eval_batch_size) * feature_map
        return 8 * 4 * parameter_count(self.model_config()) + episodes + activations

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Parses Flower's ``context.run_config``; unknown keys are an error (a typo would be ignored)."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        # A stored run config (a checkpoint's, a model card's) is data: it may be any JSON or pickle-free value.
        if not isinstance(run_config, Mapping):
            raise ValueError(f"the run config is a {type(run_config).__name__}, not a mapping of kebab-case keys to "
                             "values (e.g. {'inner-lr': 0.05}).")
        not_text = [key for key in run_config if not isinstance(key, str)]
        if not_text:
            raise ValueError(f"run-config key(s) {', '.join(map(shown, not_text[:5]))} are not text: keys are kebab-case "
                             "names such as 'inner-lr'.")
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise ValueError(
                f"unknown run-config key(s) {', '.join(k if len(k) <= 40 else shown(k, 40) for k in unknown[:5])}"
                + (f" and {len(unknown) - 5:,} more" if len(unknown) > 5 else "")
                + f"; valid keys: {', '.join(sorted(by_key))}."
            )
        values: dict[str, Any] = {}
        defaults = cls()
        for key, value in run_config.items():
            f = by_key[key]
            values[f.name] = _coerce(key, value, type(getattr(defaults, f.name)))
        return cls(**values)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The kebab-case mapping Flower expects (``--run-config`` or a TOML file)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def replace(self, **changes: Any) -> "RunConfig":
        values = asdict(self)
        values.update(changes)
        return RunConfig(**values)

    @property
    def weighting(self) -> str:
        """The site weighting in force: ``site-weighting`` with ``auto`` resolved for the algorithm."""
        if self.site_weighting != "auto":
            return self.site_weighting
        if self.dp != "none" or self.secure_aggregation != "none":  # DP's sensitivity and SecAgg's sum: one weight each
            return "per-site"
        return "data" if self.algorithm_object.data_weighted else "per-site"

    def quorum(self, sampled: int) -> int:
        """Valid replies after which a round may close at ``round-deadline``: never fewer than min-sites."""
        wanted = math.ceil(self.round_quorum * sampled - 1e-9) if self.round_quorum <= 1 else int(self.round_quorum)
        return min(sampled, max(wanted, self.min_sites, 1))

    def model_config(self) -> ModelConfig:
        channels = tuple(self.model_base_channels * 2**i for i in range(self.model_levels))
        return ModelConfig(
            spatial_dims=2,
            in_channels=self.in_channels,
            out_channels=self.num_classes,
            channels=channels,
            strides=(2,) * (self.model_levels - 1),
            num_res_units=self.model_res_units,
            norm=self.model_norm,
            learner=self.algorithm_object.learner,
            generator_width=self.generator_width,
            embedding_dim=self.prototype_dim,
            lstm_hidden=self.lstm_hidden,
        )

    def trajectory_hash(self, federation: str | None = None) -> str:
        """Hash of every key that shapes the trajectory of θ; a checkpoint resumes only under the same hash.

        Which keys join is declared beside each field (``config_sections.HashRule``). ``federation``: a digest of the
        data a simulation trains on (its manifest's cache key, ``fedmeta.common.synth.federation_digest``).
        Where the federation lies may change between a stop and a resume; what it holds may not.
        """
        relevant: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                                    if hash_rule(f).joins(getattr(self, f.name), f.name in self.algorithm_object.own_keys)}
        if federation is not None:
            relevant["federation"] = federation
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# The declarations seen whole: keys never hashed, and keys hashed only when not at their "unset" value.
_NOT_HASHED = frozenset(f.name for f in fields(RunConfig) if not hash_rule(f).hashed)
_HASHED_WHEN_SET = {f.name: hash_rule(f).omitted_at for f in fields(RunConfig) if hash_rule(f).omitted_at is not NEVER}

_STORED_CONFIG_FIX = ("use the consortium's release as published (a stored run config this large is damaged or not "
                      "meant for a site), or run it on a larger machine.")


def stored_run_config(run_config: Any, source: str, fix: str) -> RunConfig:
    """The run config a checkpoint or site model at ``source`` stores, held to the CLI's ranges and to this
    machine's memory before anything is built from it: a stored config is data, maybe damaged or hostile.
    ``fix`` ends the refusal (what the user should do instead)."""
    try:
        config = RunConfig.from_run_config(run_config)
    except ValueError as err:
        raise ValueError(f"{source}: its stored run config is refused ({err}); {fix}") from None
    problem = memory_problem(config, source)
    if problem:
        raise ValueError(problem)
    return config


def memory_problem(config: RunConfig, source: str, fix: str = _STORED_CONFIG_FIX) -> str | None:
    """Why ``config`` (read from ``source``: a checkpoint, a model card, a preset with --set) must not run on this
    machine: its :meth:`RunConfig.memory_estimate` exceeds the machine's memory. None when it fits. ``fix``: what
    the reader can do, after "Fix: "."""
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not every OS says; then only the ranges guard
        return None
    needed = config.memory_estimate()
    if needed <= limit:
        return None
    return (f"{source}: its run config (image-size={config.image_size}, model-base-channels="
            f"{config.model_base_channels}, model-levels={config.model_levels}, eval-batch-size="
            f"{config.eval_batch_size}, episodes-per-site={config.episodes_per_site}, k-shot={config.k_shot}, "
            f"q-query={config.q_query}, eval-k-shot={config.eval_k_shot}) needs about {needed / 2**30:,.1f} GiB for a "
            f"round or an adaptation (a site holds a round's episodes at once), more than this machine's "
            f"{limit / 2**30:,.1f} GiB of memory. Fix: {fix}")


def _coerce(key: str, value: Any, kind: type) -> Any:
    # TOML and `--run-config` give ints for floats ("meta-lr=1") and, from some shells, strings.
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"run config {key}={shown(value)}: expected true or false.")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"run config {key}={shown(value)}: expected an integer.")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise ValueError(f"run config {key}={shown(value)}: expected an integer.") from None
        if not number.is_integer():
            raise ValueError(f"run config {key}={shown(value)}: expected an integer.")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"run config {key}={shown(value)}: expected a number.")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"run config {key}={shown(value)}: expected a number.") from None
    return str(value)


__all__ = ["ALGORITHMS", "DEVICES", "MAX_BASE_CHANNELS", "MAX_EPISODES", "MAX_EVAL_BATCH", "MAX_IMAGE_SIZE",
           "MAX_LEARNER_SIZE", "MAX_MODEL_LEVELS", "MAX_PARAMETERS", "MAX_RES_UNITS", "MAX_SHOTS", "MAX_STEPS",
           "META_OPTIMIZERS", "SPACING_MM_RANGE", "STEP_SIZES", "Evaluation", "InnerLoop", "Learners", "Liveness", "Model", "Privacy", "Robustness", "RunConfig", "Runtime",
           "SecureAggregation", "Training", "memory_problem", "stored_run_config"]
