"""The run config's sections: its flat keys grouped by concern, each a frozen dataclass that checks its own keys.

:class:`fedmeta.common.config.RunConfig` inherits from every section, so the keys stay one flat frozen dataclass
(the kebab-case wire format of Flower's ``run_config``); ``config.privacy`` and the like give one section on its own.
A section built alone checks only its own keys; RunConfig orders all the checks, adds those that join sections, and
owns what differs by algorithm. Beside each field is declared whether it joins ``RunConfig.trajectory_hash``: a
plain default always joins; :func:`not_hashed`, :func:`hashed_when_set` and :func:`learner_key` say otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedmeta.common.algorithms import ALGORITHMS as ALGORITHM_OBJECTS
from fedmeta.common.metaopt import OPTIMIZERS as META_OPTIMIZERS
from fedmeta.common.protocol import AGGREGATIONS, ALGORITHMS, DP_MODES, SECURE_AGGREGATIONS, SITE_WEIGHTINGS
from fedmeta.common.site_layout import MAX_CHANNELS  # in-channels: a site's channels, stacked

DEVICES = ("auto", "cpu", "cuda")
STEP_SIZES = ("per-element", "per-layer-step")

# The ranges every run config is held to, wherever it comes from: the command line, a preset, --set, or a
# checkpoint's or model card's stored config (which is data, and may be damaged or hostile). Each is far beyond
# what few-shot segmentation uses and well short of what would exhaust a machine.
MAX_STEPS = 10_000  # inner, adaptation and evaluation steps: few-shot adaptation takes 5-50
SPACING_MM_RANGE = (0.1, 20.0)  # the isotropic voxel size volumes are resampled to
MAX_IMAGE_SIZE = 1024  # the model's input side (pixels)
MAX_MODEL_LEVELS = 8
MAX_BASE_CHANNELS = 256
MAX_RES_UNITS = 8
MAX_LEARNER_SIZE = 1024  # generator-width, prototype-dim, lstm-hidden
MAX_EVAL_BATCH = 1024
MAX_PARAMETERS = 100_000_000  # 400 MB of float32 weights; the default UNet has 0.2 M
# A round holds every episode of a site at once (fedmeta.common.data.sample_episodes; FOMAML with 4 or more
# episodes also runs them at once), so these bound what one round can ask of a site. Meta-learning papers use
# 1-32 episodes of 1-20 shots; the product is held to the machine's memory by RunConfig.memory_estimate.
MAX_EPISODES = 1_000  # episodes-per-site
MAX_SHOTS = 1_000  # k-shot, q-query, eval-k-shot: labelled slices in one support or query set


# Whether a key joins RunConfig.trajectory_hash is declared beside its field: a plain default always joins.
_HASH = "trajectory-hash"  # the field metadata key holding its HashRule
NEVER = object()  # an omitted_at no value equals


@dataclass(frozen=True)
class HashRule:
    """How one key joins ``RunConfig.trajectory_hash``; a field without one always joins."""

    hashed: bool = True
    omitted_at: Any = NEVER  # left out at this value: what runs did before the key existed
    algorithm_own: bool = False  # an algorithm's own key (its Algorithm.own_keys): only that algorithm's runs

    def joins(self, value: Any, owned_by_the_run: bool) -> bool:
        """``owned_by_the_run``: the run's algorithm owns this key (always true of a key no algorithm owns)."""
        return self.hashed and (not self.algorithm_own or owned_by_the_run) and not value == self.omitted_at


def not_hashed(default: Any) -> Any:
    """A key that may change between a stopped run and its resumption without changing the trajectory: where things
    live, how long to go on, how patient to be, which device computes. Held-out evaluation reads θ but never moves
    it (nor the server's RNG), so its keys may change too."""
    return field(default=default, metadata={_HASH: HashRule(hashed=False)})


def hashed_when_set(default: Any, unset: Any = NEVER) -> Any:
    """A key added after checkpoints existed: it joins the hash only when not ``unset`` (the value that does what
    runs did before the key; its default unless given), so the checkpoints written before it still resume."""
    return field(default=default, metadata={_HASH: HashRule(omitted_at=default if unset is NEVER else unset)})


def algorithm_key(default: Any) -> Any:
    """One algorithm's own key (a learner's size; which algorithm owns it, its ``Algorithm.own_keys`` say): it shapes
    only that algorithm's runs and, added later, is hashed only when set."""
    return field(default=default, metadata={_HASH: HashRule(omitted_at=default, algorithm_own=True)})


def hash_rule(f: Any) -> HashRule:
    """The declared :class:`HashRule` of a dataclass field."""
    return f.metadata.get(_HASH, HashRule())


SHOWN_CHARACTERS = 80  # of a refused value in an error: enough to recognise it, never a pasted file


def shown(value: Any, limit: int = SHOWN_CHARACTERS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with its full length said."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text):,} characters)"


def need(config: Any, condition: bool, key: str, problem: str) -> None:
    """Refuses the config unless ``condition``: the key, its value, what is wrong and what to do."""
    if not condition:
        raise ValueError(f"run config {key}={shown(getattr(config, key.replace('-', '_')))}: {problem}")


def need_finite(config: Any, *keys: str) -> None:
    """Refuses the config unless each of ``keys`` is a finite number."""
    for key in keys:
        need(config, math.isfinite(getattr(config, key.replace("-", "_"))), key, "must be a finite number.")


class _Section:
    """A section checks its own keys when built alone; RunConfig calls each ``_check`` in its own order."""

    def __post_init__(self) -> None:
        self._check()  # type: ignore[attr-defined]  # each section defines it


INNER_STEPS_FLOOR = (f"must be >= 1 (0 only for {' and '.join(n for n, a in ALGORITHM_OBJECTS.items() if not a.min_inner_steps)}, "
                     "whose adaptation needs no gradient step).")
_TOO_MANY_SHOTS = f"must be at most {MAX_SHOTS:,} slices (an episode holds them at once; 1-20 is usual)."


@dataclass(frozen=True)
class Training(_Section):
    """The outer loop: method, rounds, sites and their weights, episodes, and the server's meta-optimiser (FedOpt:
    Reddi et al., 2021, "Adaptive Federated Optimization")."""

    algorithm: str = "fomaml"
    num_rounds: int = not_hashed(10)
    sites_per_round: int = 0  # 0: every training site every round
    min_sites: int = 1  # fewer valid replies than this and the round makes no update
    site_weighting: str = "auto"  # data | per-site | auto (data for fedavg/fedprox, per-site otherwise)
    max_weight_ratio: float = 10.0  # a site's data weight is capped at this x the round's median
    episodes_per_site: int = 2
    k_shot: int = 5  # support images per episode
    q_query: int = 5  # query images per episode
    meta_optimizer: str = "adam"
    meta_lr: float = 0.003
    meta_momentum: float = 0.0
    seed: int = 0

    def _check(self) -> None:
        need(self, self.algorithm in ALGORITHMS, "algorithm",
             f"unknown algorithm; choose one of {', '.join(ALGORITHMS)}.")
        need(self, self.site_weighting in SITE_WEIGHTINGS, "site-weighting",
             f"choose one of {', '.join(SITE_WEIGHTINGS)}.")
        need(self, self.max_weight_ratio >= 1, "max-weight-ratio",
             "must be >= 1 (a site may weigh that many times the round's median site).")
        need(self, self.meta_optimizer in META_OPTIMIZERS, "meta-optimizer",
             f"unknown meta-optimiser; choose one of {', '.join(META_OPTIMIZERS)}.")
        need(self, self.num_rounds >= 0, "num-rounds", "must be >= 0.")
        need(self, self.sites_per_round >= 0, "sites-per-round", "must be >= 0 (0 means every training site).")
        need(self, self.min_sites >= 1, "min-sites", "must be >= 1.")
        need(self, self.episodes_per_site >= 1, "episodes-per-site", "must be >= 1.")
        need(self, self.k_shot >= 1, "k-shot", "must be >= 1 support image.")
        need(self, self.q_query >= 1, "q-query", "must be >= 1 query image.")
        need(self, self.episodes_per_site <= MAX_EPISODES, "episodes-per-site",
             f"must be at most {MAX_EPISODES:,} (a site holds a round's episodes at once; 1-32 is usual).")
        for key in ("k-shot", "q-query"):
            need(self, getattr(self, key.replace("-", "_")) <= MAX_SHOTS, key, _TOO_MANY_SHOTS)
        need(self, self.meta_lr > 0, "meta-lr", "must be > 0.")
        need(self, 0 <= self.meta_momentum < 1, "meta-momentum", "must be in [0, 1).")
        need_finite(self, "max-weight-ratio", "meta-lr")
        need(self, self.sites_per_round == 0 or self.sites_per_round >= self.min_sites, "sites-per-round",
             f"samples fewer sites than min-sites={self.min_sites}, so no round could update θ; sample at least "
             "min-sites (or 0 for every training site).")


@dataclass(frozen=True)
class InnerLoop(_Section):
    """A site's local update; for the MAML family the MAML++ options (Antoniou et al., 2019, "How to train your
    MAML"): multi-step loss, derivative-order annealing, per-layer per-step step sizes; Meta-SGD's per-element
    step sizes (Li et al., 2017); FedProx's proximal term (Li et al., 2020)."""

    inner_steps: int = 1
    inner_lr: float = 0.05
    proximal_mu: float = 0.0  # fedprox only
    multi_step_loss_rounds: int = hashed_when_set(0)  # MAML++ multi-step loss, annealed to the last step by then
    first_order_rounds: int = hashed_when_set(0)  # MAML++ derivative-order annealing: first order up to this round
    step_sizes: str = hashed_when_set("per-element")  # metasgd: per-element (Meta-SGD) | per-layer-step (LSLR)

    def _check(self) -> None:
        need(self, self.inner_steps >= 0, "inner-steps", INNER_STEPS_FLOOR)  # >= 1 for most: _algorithm_checks
        need(self, self.inner_steps <= MAX_STEPS, "inner-steps",
             f"must be at most {MAX_STEPS:,} (few-shot adaptation takes 1-50 steps; more would run for days).")
        need(self, self.inner_lr > 0, "inner-lr", "must be > 0.")
        need(self, self.proximal_mu >= 0, "proximal-mu", "must be >= 0.")
        need(self, self.multi_step_loss_rounds >= 0, "multi-step-loss-rounds",
             "must be >= 0 (0: the last step's loss only).")
        need(self, self.first_order_rounds >= 0, "first-order-rounds", "must be >= 0 (0: second order from round 1).")
        need(self, self.step_sizes in STEP_SIZES, "step-sizes", f"choose one of {', '.join(STEP_SIZES)}.")
        need_finite(self, "inner-lr", "proximal-mu")

    @property
    def per_layer_steps(self) -> int:
        """Inner steps with a learned step size each (MAML++ LSLR), or 0 for Meta-SGD's per-element ones."""
        return self.inner_steps if self.step_sizes == "per-layer-step" else 0


@dataclass(frozen=True)
class Learners(_Section):
    """The other families' own parts (fedmeta.common.algorithms, docs/learners.md): sizes, and the learned optimiser's
    unroll (held to inner-steps, and to its algorithm, by RunConfig)."""

    generator_width: int = algorithm_key(32)  # the support-set encoder's channels and MLP width
    prototype_dim: int = algorithm_key(32)  # channels of the pixel embedding the prototypes live in
    lstm_hidden: int = algorithm_key(8)  # the coordinate-wise LSTM's units (state: 2 x per weight)
    lstm_truncation: int = algorithm_key(0)  # backpropagate through the last N inner steps; 0 = all

    def _check(self) -> None:
        for key in ("generator-width", "prototype-dim", "lstm-hidden"):
            need(self, 1 <= getattr(self, key.replace("-", "_")) <= MAX_LEARNER_SIZE, key,
                 f"must be in [1, {MAX_LEARNER_SIZE}].")


@dataclass(frozen=True)
class Model(_Section):
    """The network's input and the UNet's shape; the network as built (norm, widths, parameter count) is checked by
    RunConfig, which knows the learner it becomes."""

    image_size: int = 64
    spacing_mm: float = 3.0  # isotropic voxel size the reader resamples to: 64 x 3 mm holds the whole brain
    num_classes: int = 4
    model_base_channels: int = 16
    model_levels: int = 4
    model_res_units: int = 1
    model_norm: str = "instance"
    # A site's data beyond one MR channel (issue 30): written by `fedmeta plan` from the sites' fingerprints, hashed
    # only when set so the brain runs' checkpoints still resume.
    in_channels: int = hashed_when_set(1)  # the model's input channels: a site's channels, stacked
    channels: str = hashed_when_set("")  # their names in order, comma-separated ("FLAIR,T1w,t1gd,T2w"); "" = any one
    slice_spacing_mm: float = hashed_when_set(0.0)  # the spacing along S (between axial slices); 0 = spacing-mm
    ct_clip_low: float = hashed_when_set(-1024.0)  # HU window every CT channel is clipped to ...
    ct_clip_high: float = hashed_when_set(3071.0)
    ct_mean: float = hashed_when_set(0.0)  # ... and standardised with: the federation's foreground statistics ...
    ct_std: float = hashed_when_set(0.0)  # ... 0: none planned, each CT image over its own body
    plan_sha256: str = hashed_when_set("")  # the plan.json these values came from: the plan is in the trajectory

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.channels.split(",")) if self.channels.strip() else ()

    def _check(self) -> None:
        need(self, 1 <= self.in_channels <= MAX_CHANNELS, "in-channels",
             f"must be 1 to {MAX_CHANNELS}: a site's image channels (4 for MSD's BrainTumour), stacked.")
        need(self, (len(self.channel_names) == self.in_channels and all(self.channel_names))
             or (not self.channel_names and self.in_channels == 1),
             "channels", f"must name in-channels={self.in_channels} channels, comma-separated in the order the model "
             "takes them (e.g. \"T2,ADC\"), or be \"\" for one channel of any name: without names, two sites' "
             "channels could stack in different orders.")
        need(self, self.slice_spacing_mm == 0 or SPACING_MM_RANGE[0] <= self.slice_spacing_mm <= SPACING_MM_RANGE[1],
             "slice-spacing-mm", f"must be 0 (= spacing-mm) or a voxel size in mm in [{SPACING_MM_RANGE[0]:g}, "
             f"{SPACING_MM_RANGE[1]:g}].")
        need_finite(self, "slice-spacing-mm", "ct-clip-low", "ct-clip-high", "ct-mean", "ct-std")
        need(self, self.ct_clip_low < self.ct_clip_high, "ct-clip-low",
             f"must be below ct-clip-high={self.ct_clip_high!r} (a HU window, e.g. -1024 to 3071).")
        need(self, self.ct_std >= 0, "ct-std", "must be >= 0 (0: standardise each CT image over its own body).")
        need(self, self.plan_sha256 == "" or (len(self.plan_sha256) == 64
                                               and all(c in "0123456789abcdef" for c in self.plan_sha256)),
             "plan-sha256", "must be \"\" or the 64 hex digits `fedmeta plan` wrote into run-config.toml.")
        need(self, 2 <= self.num_classes <= 256, "num-classes",
             "must be in [2, 256] (background plus a structure; labels are held as uint8).")
        low_mm, high_mm = SPACING_MM_RANGE
        need(self, low_mm <= self.spacing_mm <= high_mm, "spacing-mm",
             f"must be a voxel size in mm in [{low_mm:g}, {high_mm:g}], e.g. 3.0 (finer would resample a head to "
             "billions of voxels).")
        need(self, 1 <= self.model_base_channels <= MAX_BASE_CHANNELS, "model-base-channels",
             f"must be in [1, {MAX_BASE_CHANNELS}].")
        need(self, 2 <= self.model_levels <= MAX_MODEL_LEVELS, "model-levels", f"must be in [2, {MAX_MODEL_LEVELS}].")
        need(self, 0 <= self.model_res_units <= MAX_RES_UNITS, "model-res-units", f"must be in [0, {MAX_RES_UNITS}].")
        factor = 2 ** (self.model_levels - 1)
        need(self, self.image_size >= 2 * factor and self.image_size % factor == 0, "image-size",
             f"must be a multiple of {factor} (2^(model-levels - 1)) so the UNet's skips line up, and at least "
             f"{2 * factor}: instance norm needs 2 pixels a side at the UNet's deepest level.")
        need(self, self.image_size <= MAX_IMAGE_SIZE, "image-size",
             f"must be at most {MAX_IMAGE_SIZE} pixels a side (a slice at the model's spacing; 64-256 is usual).")
        need_finite(self, "spacing-mm")

    def data_config(self, **changes: Any):
        """How a site's volumes become this run's model inputs (``fedmeta.common.data.DataConfig``)."""
        from fedmeta.common.data import DataConfig  # torch and nibabel only where data is read

        return DataConfig(image_size=(self.image_size, self.image_size), num_classes=self.num_classes,
                          spacing=(self.spacing_mm, self.spacing_mm, self.slice_spacing_mm or self.spacing_mm),
                          in_channels=self.in_channels, channel_names=self.channel_names,
                          ct_window=(self.ct_clip_low, self.ct_clip_high), ct_mean=self.ct_mean, ct_std=self.ct_std,
                          **changes)


@dataclass(frozen=True)
class Evaluation(_Section):
    """Held-out evaluation during training: it reads θ but never moves it, so none of its keys is hashed."""

    eval_every: int = not_hashed(1)  # 0: never evaluate on held-out sites during training
    eval_k_shot: int = not_hashed(5)
    eval_steps: str = not_hashed("0,5,10")  # comma-separated adaptation step counts
    eval_batch_size: int = not_hashed(32)
    eval_max_images: int = not_hashed(256)  # slices per held-out site, in whole patients (seeded); 0 = every patient
    # How a new site adapts θ (fedmeta.common.adaptation_variants): what the consortium that trained θ tells its
    # sites, so every held-out evaluation, `fedmeta evaluate` and `fedmeta adapt` (its default) adapt alike.
    adapt_variant: str = not_hashed("fine-tune")

    def _check(self) -> None:
        need(self, self.eval_k_shot <= MAX_SHOTS, "eval-k-shot", _TOO_MANY_SHOTS)
        need(self, self.eval_every >= 0, "eval-every", "must be >= 0 (0 disables held-out evaluation).")
        need(self, self.eval_k_shot >= 1, "eval-k-shot", "must be >= 1.")
        need(self, 1 <= self.eval_batch_size <= MAX_EVAL_BATCH, "eval-batch-size",
             f"must be in [1, {MAX_EVAL_BATCH}].")
        need(self, self.eval_max_images >= 0, "eval-max-images", "must be >= 0 (0 scores every evaluation patient).")
        try:
            steps = self.adaptation_steps
        except ValueError:
            steps = ()
        need(self, bool(steps) and all(0 <= s <= MAX_STEPS for s in steps), "eval-steps",
             f"must be comma-separated integers from 0 to {MAX_STEPS:,}, e.g. '0,5,10'.")

    @property
    def adaptation_steps(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.eval_steps.split(",") if s.strip())


@dataclass(frozen=True)
class Runtime(_Section):
    """Where the run's files live, which device computes, what it shows and whether it signs its release."""

    resume: bool = not_hashed(False)
    # A deployment's plan round (fedmeta.server.plan_round): the ServerApp asks the training sites for their
    # fingerprints, writes plan.json and run-config.toml into out-dir and ends without training. Not hashed: it
    # trains nothing, so no trajectory has it (the plan it writes joins the hash as plan-sha256).
    plan_round: bool = not_hashed(False)
    out_dir: str = not_hashed("")
    federation_dir: str = not_hashed("")
    device: str = not_hashed("auto")
    metrics_port: int = not_hashed(0)  # the ServerApp's Prometheus /metrics port; 0 = off
    metrics_address: str = not_hashed("127.0.0.1")  # the interface /metrics listens on
    # The consortium's Ed25519 private key (a PEM path on the ServerApp's machine): when set, the final checkpoint
    # is signed as a release (fedmeta.common.release); "" = not signed.
    release_key: str = not_hashed("")

    def _check(self) -> None:
        need(self, self.device in DEVICES, "device", f"choose one of {', '.join(DEVICES)}.")
        need(self, 0 <= self.metrics_port <= 65535, "metrics-port",
             "must be a TCP port (1-65535), or 0 for no /metrics.")


@dataclass(frozen=True)
class Liveness(_Section):
    """How long a round waits for its sites, and when a silent site or a failing run is given up on
    (docs/deployment-liveness.md)."""

    round_timeout: float = not_hashed(600.0)  # a round never waits longer than this for its replies
    round_deadline: float = not_hashed(120.0)  # after this, a round closes as soon as round-quorum sites answered
    round_quorum: float = not_hashed(0.5)  # <= 1: fraction of the sampled sites (1 = all); > 1: a count of sites
    max_missed_rounds: int = not_hashed(3)  # a site missing this many rounds in a row is left out until it answers
    node_wait_timeout: float = not_hashed(120.0)
    max_failed_rounds: int = not_hashed(3)  # rounds in a row whose every reply failed before the run stops; 0 = never

    def _check(self) -> None:
        need_finite(self, "round-timeout", "round-deadline", "round-quorum", "node-wait-timeout")
        need(self, self.round_timeout > 0, "round-timeout", "must be > 0 seconds.")
        need(self, self.round_deadline > 0, "round-deadline", "must be > 0 seconds (at most round-timeout to matter).")
        need(self, self.round_quorum > 0 and (self.round_quorum <= 1 or self.round_quorum == int(self.round_quorum)),
             "round-quorum", "must be a fraction of the sampled sites in (0, 1] (1 = every sampled site) or a whole "
             "number of sites >= 2.")
        need(self, self.max_missed_rounds >= 0, "max-missed-rounds",
             "must be >= 0 (0: a site that misses rounds is never left out).")
        need(self, self.node_wait_timeout >= 0, "node-wait-timeout", "must be >= 0 seconds.")
        need(self, self.max_failed_rounds >= 0, "max-failed-rounds", "must be >= 0 (0: never stop on failed rounds).")


@dataclass(frozen=True)
class Privacy(_Section):
    """Site-level differential privacy (fedmeta.common.privacy, docs/privacy.md; McMahan et al., 2018): each reply
    clipped to dp-clip-norm (C), Gaussian noise dp-noise-multiplier x C on the round's sum, added by the server or
    split over the sites."""

    dp: str = hashed_when_set("none")  # none | central | local
    dp_clip_norm: float = hashed_when_set(1.0)
    dp_noise_multiplier: float = hashed_when_set(1.0)
    dp_delta: float = hashed_when_set(1e-5)
    dp_max_epsilon: float = not_hashed(0.0)  # the run stops before a round takes epsilon above this; 0 = no limit
    dp_seeded_noise: bool = hashed_when_set(False)  # noise from the run's seed (simulations, no privacy); else the OS's

    def _check(self) -> None:
        need_finite(self, "dp-clip-norm", "dp-noise-multiplier", "dp-delta", "dp-max-epsilon")
        need(self, self.dp in DP_MODES, "dp", f"choose one of {', '.join(DP_MODES)}.")
        need(self, self.dp_clip_norm > 0, "dp-clip-norm", "must be > 0 (the L2 bound on each site's whole reply).")
        need(self, self.dp_noise_multiplier > 0, "dp-noise-multiplier",
             "must be > 0 (noise std / clip norm; 1.0 is a common start).")
        need(self, 0 < self.dp_delta < 1, "dp-delta", "must be in (0, 1), e.g. 1e-5 (well below 1 / number of sites).")
        need(self, self.dp_max_epsilon >= 0, "dp-max-epsilon", "must be >= 0 (0: no limit).")


@dataclass(frozen=True)
class Robustness(_Section):
    """Byzantine robustness (fedmeta.server.aggregation): how replies combine — trimmed mean and median (Yin et al.,
    2018), Multi-Krum (Blanchard et al., 2017) — and bounds on each reply's norm."""

    aggregation: str = hashed_when_set("mean")  # mean | trimmed-mean | median | krum
    aggregation_trim: float = hashed_when_set(0.2)  # trimmed-mean: fraction cut per side (one reply or more from 3)
    krum_byzantine: int = hashed_when_set(1)  # krum: replies assumed Byzantine (f); Multi-Krum averages the n - f best
    max_update_norm: float = hashed_when_set(0.0)  # a reply whose L2 norm (all arrays) exceeds this is refused; 0: off
    # Each reply is scaled down to at most this multiple of the round's (lower) median reply norm before it is combined,
    # so one site cannot move θ arbitrarily, whatever the rule; 0 = off. Runs from before this key had no such bound,
    # so 0 (not the default) is the value that leaves it out of the hash.
    median_norm_bound: float = hashed_when_set(1.0, unset=0.0)

    def _check(self) -> None:
        need_finite(self, "aggregation-trim", "max-update-norm", "median-norm-bound")
        need(self, self.aggregation in AGGREGATIONS, "aggregation", f"choose one of {', '.join(AGGREGATIONS)}.")
        need(self, 0 <= self.aggregation_trim < 0.5, "aggregation-trim",
             "must be in [0, 0.5): the fraction cut per side.")
        need(self, self.krum_byzantine >= 0, "krum-byzantine",
             "must be >= 0 (the number of Byzantine replies Krum tolerates).")
        need(self, self.max_update_norm >= 0, "max-update-norm", "must be >= 0 (0: no bound on a reply's norm).")
        need(self, self.median_norm_bound == 0 or self.median_norm_bound >= 1, "median-norm-bound",
             "must be 0 (off) or >= 1: a bound below the round's median norm would shrink most honest replies; "
             "1.0 (no reply counts for more than the median one) is the default.")


@dataclass(frozen=True)
class SecureAggregation(_Section):
    """SecAgg+ (Bell et al., 2020; SecAgg: Bonawitz et al., 2017): the server learns only the sum of the round's
    quantised replies."""

    secure_aggregation: str = hashed_when_set("none")  # none | secagg+
    secagg_threshold: float = hashed_when_set(0.6)  # share of a site's neighbourhood that recovers its secrets
    secagg_neighbours: int = hashed_when_set(0)  # SecAgg+'s sparse graph: neighbours per site; 0 = all others (SecAgg)
    secagg_clip_range: float = hashed_when_set(8.0)  # replies are clipped elementwise to +-this before quantisation
    secagg_levels: int = hashed_when_set(0)  # levels over [-range, range]; 0 = the most the 2^32 modulus allows

    def _check(self) -> None:
        need(self, self.secure_aggregation in SECURE_AGGREGATIONS, "secure-aggregation",
             f"choose one of {', '.join(SECURE_AGGREGATIONS)}.")
        need(self, 0.5 <= self.secagg_threshold <= 1, "secagg-threshold",
             "must be in [0.5, 1]: the fraction of a site's neighbourhood needed to recover its secrets.")
        need(self, self.secagg_neighbours >= 0, "secagg-neighbours", "must be >= 0 (0: every other site).")
        need(self, math.isfinite(self.secagg_clip_range) and self.secagg_clip_range > 0, "secagg-clip-range",
             "must be a finite number > 0.")
        need(self, self.secagg_levels == 0 or 2 <= self.secagg_levels <= 2**30, "secagg-levels",
             "must be 0 (the most the modulus allows) or in [2, 2^30].")


__all__ = ["DEVICES", "INNER_STEPS_FLOOR", "MAX_BASE_CHANNELS", "MAX_EPISODES", "MAX_EVAL_BATCH", "MAX_IMAGE_SIZE",
           "MAX_LEARNER_SIZE", "MAX_MODEL_LEVELS", "MAX_PARAMETERS", "MAX_RES_UNITS", "MAX_SHOTS", "MAX_STEPS",
           "META_OPTIMIZERS", "NEVER", "SPACING_MM_RANGE", "STEP_SIZES", "Evaluation", "HashRule", "InnerLoop",
           "Learners", "Liveness", "Model", "Privacy", "Robustness", "Runtime", "SecureAggregation", "Training",
           "algorithm_key", "hash_rule", "hashed_when_set", "need", "need_finite", "not_hashed"]
