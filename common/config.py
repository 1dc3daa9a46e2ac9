"""The run configuration: Flower's flat kebab-case ``run_config`` parsed once into a frozen dataclass.

Defaults live in one place, ``[tool.flwr.app.config]`` of pyproject.toml; this module only knows
the keys, their types and what values are legal. Both apps call :meth:`RunConfig.from_run_config`
at their edge and pass the dataclass inward, so inner code never reads strings.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from fedmeta.common.model import ModelConfig, parameter_count
from fedmeta.common.protocol import (
    AGGREGATIONS, ALGORITHMS, DP_MODES, LEARNER_ALGORITHMS, SECURE_AGGREGATIONS, SITE_WEIGHTINGS,
)
META_OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")

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

# Keys that may change between a stopped run and its resumption without changing the trajectory:
# where things live, how long to go on, how patient to be, which device computes.
# Held-out evaluation reads θ but never moves it (nor the server's RNG), so its keys may change too.
_NOT_HASHED = frozenset({"num_rounds", "resume", "out_dir", "federation_dir", "device", "round_timeout",
                         "round_deadline", "round_quorum", "max_missed_rounds", "node_wait_timeout", "eval_every",
                         "eval_k_shot", "eval_steps", "eval_batch_size", "eval_max_images", "metrics_port",
                         "metrics_address", "dp_max_epsilon", "max_failed_rounds", "release_key"})


# Keys added after checkpoints existed; they join the hash only when set (their default changes nothing).
_HASHED_WHEN_SET = {"multi_step_loss_rounds": 0, "first_order_rounds": 0, "step_sizes": "per-element",
                    "dp": "none", "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 1e-5,
                    "dp_seeded_noise": False, "aggregation": "mean", "aggregation_trim": 0.2,
                    "krum_byzantine": 1, "max_update_norm": 0.0, "median_norm_bound": 0.0,
                    "secure_aggregation": "none", "secagg_threshold": 0.6, "secagg_neighbours": 0,
                    "secagg_clip_range": 8.0, "secagg_levels": 0,
                    "generator_width": 32, "prototype_dim": 32, "lstm_hidden": 8, "lstm_truncation": 0}
STEP_SIZES = ("per-element", "per-layer-step")
_LEARNER_KEYS = {"generator_width": ("fast-weights",), "prototype_dim": ("prototypes",),
                 "lstm_hidden": ("lstm-optimizer",), "lstm_truncation": ("lstm-optimizer",)}


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a fedmeta run. Field ``inner_lr`` is key ``inner-lr`` on the wire."""

    algorithm: str = "fomaml"
    num_rounds: int = 10
    sites_per_round: int = 0  # 0: every training site every round
    min_sites: int = 1  # fewer valid replies than this and the round makes no update
    site_weighting: str = "auto"  # data | per-site | auto (data for fedavg/fedprox, per-site otherwise)
    max_weight_ratio: float = 10.0  # a site's data weight is capped at this x the round's median
    episodes_per_site: int = 2
    k_shot: int = 5  # support images per episode
    q_query: int = 5  # query images per episode
    inner_steps: int = 1
    inner_lr: float = 0.05
    meta_optimizer: str = "adam"
    meta_lr: float = 0.003
    meta_momentum: float = 0.0
    proximal_mu: float = 0.0  # fedprox only
    multi_step_loss_rounds: int = 0  # MAML++ multi-step loss, annealed to the last step by this round
    first_order_rounds: int = 0  # MAML++ derivative-order annealing: first order up to this round
    step_sizes: str = "per-element"  # metasgd: learned step sizes per-element (Meta-SGD) | per-layer-step (MAML++ LSLR)
    # The other families (fedmeta.common.learners): their own parts' sizes, and the learned optimiser's unroll.
    generator_width: int = 32  # fast-weights: the support-set encoder's channels and MLP width
    prototype_dim: int = 32  # prototypes: channels of the pixel embedding the prototypes live in
    lstm_hidden: int = 8  # lstm-optimizer: hidden units of the coordinate-wise LSTM (its state: 2 x this per parameter)
    lstm_truncation: int = 0  # lstm-optimizer: backpropagate through the last N inner steps only; 0 = all
    image_size: int = 64
    spacing_mm: float = 3.0  # isotropic voxel size the reader resamples to: 64 x 3 mm holds the whole brain
    num_classes: int = 4
    model_base_channels: int = 16
    model_levels: int = 4
    model_res_units: int = 1
    model_norm: str = "instance"
    eval_every: int = 1  # 0: never evaluate on held-out sites during training
    eval_k_shot: int = 5
    eval_steps: str = "0,5,10"  # comma-separated adaptation step counts
    eval_batch_size: int = 32
    eval_max_images: int = 256  # evaluation slices per held-out site, in whole patients (seeded); 0 = every patient
    seed: int = 0
    resume: bool = False
    out_dir: str = ""
    federation_dir: str = ""
    device: str = "auto"
    round_timeout: float = 600.0  # a round never waits longer than this for its replies
    round_deadline: float = 120.0  # after this, a round closes as soon as round-quorum sites answered
    round_quorum: float = 0.5  # <= 1: fraction of the sampled sites (1 = all); > 1: a count of sites
    max_missed_rounds: int = 3  # a site that misses this many rounds in a row is left out until it answers again
    node_wait_timeout: float = 120.0
    metrics_port: int = 0  # the ServerApp's Prometheus /metrics port; 0 = off
    metrics_address: str = "127.0.0.1"  # the interface /metrics listens on
    # The consortium's Ed25519 private key (PEM path on the ServerApp's machine): when set, the final
    # checkpoint is signed as a release (fedmeta.common.release); "" = not signed.
    release_key: str = ""
    # Site-level differential privacy (fedmeta.common.privacy): each reply clipped to dp-clip-norm (C),
    # Gaussian noise dp-noise-multiplier x C on the round's sum, added by the server or split over the sites.
    dp: str = "none"  # none | central | local
    dp_clip_norm: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_delta: float = 1e-5
    dp_max_epsilon: float = 0.0  # the run stops before a round would take epsilon above this; 0 = no limit
    dp_seeded_noise: bool = False  # noise from the run's seed (reproducible simulations, no privacy); else OS randomness
    # Byzantine robustness (fedmeta.server.aggregation): how replies combine, and a bound on each reply's norm.
    aggregation: str = "mean"  # mean | trimmed-mean | median | krum
    aggregation_trim: float = 0.2  # trimmed-mean: fraction cut per side (at least one reply whenever 3+ answered)
    krum_byzantine: int = 1  # krum: replies assumed Byzantine (f); Multi-Krum averages the n - f best
    max_update_norm: float = 0.0  # a reply whose L2 norm (all arrays) exceeds this is rejected; 0 = no bound
    # Each reply is scaled down to at most this multiple of the round's (lower) median reply norm before it is
    # combined, so one site cannot move θ arbitrarily, whatever the rule; 0 = off (fedmeta.server.aggregation).
    median_norm_bound: float = 1.0
    max_failed_rounds: int = 3  # rounds in a row whose every reply failed before the run stops with an error; 0 = never
    # Secure aggregation (SecAgg+): the server learns only the sum of the round's quantised replies.
    secure_aggregation: str = "none"  # none | secagg+
    secagg_threshold: float = 0.6  # fraction of a site's neighbourhood whose shares recover its secrets
    secagg_neighbours: int = 0  # SecAgg+'s sparse graph: neighbours per site; 0 = every other site (SecAgg)
    secagg_clip_range: float = 8.0  # replies are clipped elementwise to +-this before quantisation
    secagg_levels: int = 0  # quantisation levels over [-range, range]; 0 = the most the 2^32 modulus allows for the round

    def __post_init__(self) -> None:
        def need(condition: bool, key: str, problem: str) -> None:
            if not condition:
                value = getattr(self, key.replace("-", "_"))
                raise ValueError(f"run config {key}={value!r}: {problem}")

        need(self.algorithm in ALGORITHMS, "algorithm", f"unknown algorithm; choose one of {', '.join(ALGORITHMS)}.")
        need(self.site_weighting in SITE_WEIGHTINGS, "site-weighting",
             f"choose one of {', '.join(SITE_WEIGHTINGS)}.")
        need(self.max_weight_ratio >= 1, "max-weight-ratio",
             "must be >= 1 (a site may weigh that many times the round's median site).")
        need(self.meta_optimizer in META_OPTIMIZERS, "meta-optimizer",
             f"unknown meta-optimiser; choose one of {', '.join(META_OPTIMIZERS)}.")
        need(self.device in DEVICES, "device", f"choose one of {', '.join(DEVICES)}.")
        need(self.num_rounds >= 0, "num-rounds", "must be >= 0.")
        need(self.sites_per_round >= 0, "sites-per-round", "must be >= 0 (0 means every training site).")
        need(self.min_sites >= 1, "min-sites", "must be >= 1.")
        need(self.episodes_per_site >= 1, "episodes-per-site", "must be >= 1.")
        need(self.k_shot >= 1, "k-shot", "must be >= 1 support image.")
        need(self.q_query >= 1, "q-query", "must be >= 1 query image.")
        need(self.episodes_per_site <= MAX_EPISODES, "episodes-per-site",
             f"must be at most {MAX_EPISODES:,} (a site holds a round's episodes at once; 1-32 is usual).")
        for key in ("k-shot", "q-query", "eval-k-shot"):
            need(getattr(self, key.replace("-", "_")) <= MAX_SHOTS, key,
                 f"must be at most {MAX_SHOTS:,} slices (an episode holds them at once; 1-20 is usual).")
        need(self.inner_steps >= (0 if self.algorithm in ("fast-weights", "prototypes") else 1), "inner-steps",
             "must be >= 1 (0 only for fast-weights and prototypes, whose adaptation needs no gradient step).")
        need(self.inner_steps <= MAX_STEPS, "inner-steps",
             f"must be at most {MAX_STEPS:,} (few-shot adaptation takes 1-50 steps; more would run for days).")
        need(self.inner_lr > 0, "inner-lr", "must be > 0.")
        need(self.meta_lr > 0, "meta-lr", "must be > 0.")
        need(0 <= self.meta_momentum < 1, "meta-momentum", "must be in [0, 1).")
        need(self.proximal_mu >= 0, "proximal-mu", "must be >= 0.")
        need(self.multi_step_loss_rounds >= 0, "multi-step-loss-rounds", "must be >= 0 (0: the last step's loss only).")
        need(self.multi_step_loss_rounds == 0 or self.algorithm in ("maml", "metasgd", "anil"), "multi-step-loss-rounds",
             f"the multi-step loss applies to maml, metasgd and anil, not algorithm={self.algorithm!r}; set it to 0.")
        need(self.first_order_rounds >= 0, "first-order-rounds", "must be >= 0 (0: second order from round 1).")
        need(self.first_order_rounds == 0 or self.algorithm in ("maml", "anil"), "first-order-rounds",
             f"derivative-order annealing applies to maml and anil, not algorithm={self.algorithm!r} "
             "(metasgd learns its step sizes through the second-order path); set it to 0.")
        need(self.step_sizes in STEP_SIZES, "step-sizes", f"choose one of {', '.join(STEP_SIZES)}.")
        need(self.step_sizes == "per-element" or self.algorithm == "metasgd", "step-sizes",
             f"learned step sizes belong to metasgd, not algorithm={self.algorithm!r}; leave it at per-element.")
        for key in ("generator-width", "prototype-dim", "lstm-hidden"):
            need(1 <= getattr(self, key.replace("-", "_")) <= MAX_LEARNER_SIZE, key, f"must be in [1, {MAX_LEARNER_SIZE}].")
        need(0 <= self.lstm_truncation <= self.inner_steps, "lstm-truncation",
             f"must be in [0, inner-steps={self.inner_steps}]: the inner steps backpropagated through (0: all).")
        need(self.lstm_truncation == 0 or self.algorithm == "lstm-optimizer", "lstm-truncation",
             f"truncates the learned optimiser's unroll; algorithm={self.algorithm!r} has none. Set it to 0.")
        need(2 <= self.num_classes <= 256, "num-classes",
             "must be in [2, 256] (background plus a structure; labels are held as uint8).")
        low_mm, high_mm = SPACING_MM_RANGE
        need(low_mm <= self.spacing_mm <= high_mm, "spacing-mm",
             f"must be a voxel size in mm in [{low_mm:g}, {high_mm:g}], e.g. 3.0 (finer would resample a head to "
             "billions of voxels).")
        need(1 <= self.model_base_channels <= MAX_BASE_CHANNELS, "model-base-channels",
             f"must be in [1, {MAX_BASE_CHANNELS}].")
        need(2 <= self.model_levels <= MAX_MODEL_LEVELS, "model-levels", f"must be in [2, {MAX_MODEL_LEVELS}].")
        need(0 <= self.model_res_units <= MAX_RES_UNITS, "model-res-units", f"must be in [0, {MAX_RES_UNITS}].")
        factor = 2 ** (self.model_levels - 1)
        need(self.image_size >= factor and self.image_size % factor == 0, "image-size",
             f"must be a positive multiple of {factor} (2^(model-levels - 1)) so the UNet's skips line up.")
        need(self.image_size <= MAX_IMAGE_SIZE, "image-size",
             f"must be at most {MAX_IMAGE_SIZE} pixels a side (a slice at the model's spacing; 64-256 is usual).")
        need(self.eval_every >= 0, "eval-every", "must be >= 0 (0 disables held-out evaluation).")
        need(self.eval_k_shot >= 1, "eval-k-shot", "must be >= 1.")
        need(1 <= self.eval_batch_size <= MAX_EVAL_BATCH, "eval-batch-size", f"must be in [1, {MAX_EVAL_BATCH}].")
        need(self.eval_max_images >= 0, "eval-max-images", "must be >= 0 (0 scores every evaluation patient).")
        for key in ("round-timeout", "round-deadline", "round-quorum", "node-wait-timeout", "max-weight-ratio",
                    "inner-lr", "meta-lr", "proximal-mu", "spacing-mm"):
            need(math.isfinite(getattr(self, key.replace("-", "_"))), key, "must be a finite number.")
        need(self.round_timeout > 0, "round-timeout", "must be > 0 seconds.")
        need(self.sites_per_round == 0 or self.sites_per_round >= self.min_sites, "sites-per-round",
             f"samples fewer sites than min-sites={self.min_sites}, so no round could update θ; sample at least "
             "min-sites (or 0 for every training site).")
        need(self.round_deadline > 0, "round-deadline", "must be > 0 seconds (at most round-timeout to matter).")
        need(self.round_quorum > 0 and (self.round_quorum <= 1 or self.round_quorum == int(self.round_quorum)),
             "round-quorum", "must be a fraction of the sampled sites in (0, 1] (1 = every sampled site) or a whole "
             "number of sites >= 2.")
        need(self.max_missed_rounds >= 0, "max-missed-rounds",
             "must be >= 0 (0: a site that misses rounds is never left out).")
        need(self.node_wait_timeout >= 0, "node-wait-timeout", "must be >= 0 seconds.")
        for key in ("dp-clip-norm", "dp-noise-multiplier", "dp-delta", "dp-max-epsilon", "aggregation-trim",
                    "max-update-norm", "median-norm-bound"):
            need(math.isfinite(getattr(self, key.replace("-", "_"))), key, "must be a finite number.")
        need(self.dp in DP_MODES, "dp", f"choose one of {', '.join(DP_MODES)}.")
        need(self.dp_clip_norm > 0, "dp-clip-norm", "must be > 0 (the L2 bound on each site's whole reply).")
        need(self.dp_noise_multiplier > 0, "dp-noise-multiplier",
             "must be > 0 (noise std / clip norm; 1.0 is a common start).")
        need(0 < self.dp_delta < 1, "dp-delta", "must be in (0, 1), e.g. 1e-5 (well below 1 / number of sites).")
        need(self.dp_max_epsilon >= 0, "dp-max-epsilon", "must be >= 0 (0: no limit).")
        need(self.dp == "none" or self.aggregation == "mean", "aggregation",
             f"differential privacy (dp={self.dp!r}) calibrates its noise to the mean of clipped replies; "
             "use aggregation='mean' with dp (clipping already bounds each site's influence).")
        need(self.dp == "none" or self.site_weighting != "data", "site-weighting",
             "differential privacy needs every site to weigh the same (a data-size weight changes the "
             "sensitivity); use site-weighting='per-site' or 'auto' with dp.")
        need(self.secure_aggregation in SECURE_AGGREGATIONS, "secure-aggregation",
             f"choose one of {', '.join(SECURE_AGGREGATIONS)}.")
        secure = self.secure_aggregation != "none"
        need(not secure or self.aggregation == "mean", "aggregation",
             "secure aggregation reveals only the sum, so a rule that looks at single replies cannot run on it; "
             "use aggregation='mean' with secure-aggregation (bound replies with DP clipping instead).")
        need(not secure or self.dp != "central", "dp",
             "central DP clips each reply at the server, which secure aggregation never shows it; use dp='local' "
             "(each site clips and adds its share of the noise) with secure-aggregation.")
        need(self.dp != "local" or secure, "dp",
             "local DP splits the noise over the round's sites (sigma*C/sqrt(m) each), so one reply alone carries "
             "too little noise for the guarantee: the server must see only the sum. Set secure-aggregation="
             "'secagg+' with dp='local', or use dp='central' (a trusted server adds the noise).")
        need(not secure or not self.max_update_norm, "max-update-norm",
             "secure aggregation never shows the server a single reply, so it cannot measure one's norm; set "
             "max-update-norm=0 and bound replies with dp='local' clipping (and secagg-clip-range).")
        need(not secure or self.site_weighting != "data", "site-weighting",
             "secure aggregation sums unweighted replies; use site-weighting='per-site' or 'auto'.")
        need(0.5 <= self.secagg_threshold <= 1, "secagg-threshold",
             "must be in [0.5, 1]: the fraction of a site's neighbourhood needed to recover its secrets.")
        need(self.secagg_neighbours >= 0, "secagg-neighbours", "must be >= 0 (0: every other site).")
        need(math.isfinite(self.secagg_clip_range) and self.secagg_clip_range > 0, "secagg-clip-range",
             "must be a finite number > 0.")
        # A sparse graph lets a server that withholds shares cut the answered sites into pieces of k + 1 and
        # unmask each alone; sites refuse pieces smaller than min-sites (and than the local DP split).
        need(not (secure and self.secagg_neighbours) or self.secagg_neighbours + 1 >= max(2, self.min_sites),
             "secagg-neighbours", f"with min-sites={self.min_sites}, a sparse graph needs at least "
             f"{max(2, self.min_sites) - 1} neighbours per site (or 0: every other site), or no sum could be unmasked.")
        need(not (secure and self.secagg_neighbours) or self.dp != "local", "secagg-neighbours",
             "dp='local' splits the noise over the round's quorum, which a sparse graph's pieces may be smaller "
             "than; use secagg-neighbours=0 (every other site) with dp='local'.")
        if secure and self.dp == "local":  # the largest per-site noise: split over the fewest replies allowed
            reach = self.dp_clip_norm * (1 + 6 * self.dp_noise_multiplier / math.sqrt(max(1, self.min_sites)))
            need(self.secagg_clip_range >= reach, "secagg-clip-range",
                 f"the quantiser clips each element to +-{self.secagg_clip_range:g} after the local DP noise is added; "
                 f"with dp-clip-norm={self.dp_clip_norm:g} and dp-noise-multiplier={self.dp_noise_multiplier:g} it "
                 f"must be at least C + 6 sd = {reach:.3g}, or it cuts the noise the accountant books.")
        need(self.secagg_levels == 0 or 2 <= self.secagg_levels <= 2**30, "secagg-levels",
             "must be 0 (the most the modulus allows) or in [2, 2^30].")
        need(self.aggregation in AGGREGATIONS, "aggregation", f"choose one of {', '.join(AGGREGATIONS)}.")
        need(0 <= self.aggregation_trim < 0.5, "aggregation-trim", "must be in [0, 0.5): the fraction cut per side.")
        need(self.krum_byzantine >= 0, "krum-byzantine", "must be >= 0 (the number of Byzantine replies Krum tolerates).")
        need(self.max_update_norm >= 0, "max-update-norm", "must be >= 0 (0: no bound on a reply's norm).")
        need(self.median_norm_bound == 0 or self.median_norm_bound >= 1, "median-norm-bound",
             "must be 0 (off) or >= 1: a bound below the round's median norm would shrink most honest replies; "
             "1.0 (no reply counts for more than the median one) is the default.")
        need(self.max_failed_rounds >= 0, "max-failed-rounds", "must be >= 0 (0: never stop on failed rounds).")
        need(0 <= self.metrics_port <= 65535, "metrics-port", "must be a TCP port (1-65535), or 0 for no /metrics.")
        try:
            steps = self.adaptation_steps
        except ValueError:
            steps = ()
        need(bool(steps) and all(0 <= s <= MAX_STEPS for s in steps), "eval-steps",
             f"must be comma-separated integers from 0 to {MAX_STEPS:,}, e.g. '0,5,10'.")
        # Model validation (norm, widths) belongs to ModelConfig; surface its message with the key.
        try:
            model = self.model_config()
        except ValueError as err:
            raise ValueError(f"run config model-*: {err}") from None
        count = parameter_count(model)  # counted without allocating: before any caller builds the network
        need(count <= MAX_PARAMETERS, "model-base-channels",
             f"with model-levels={self.model_levels} and model-res-units={self.model_res_units} the network has "
             f"{count:,} parameters ({count * 4 / 2**30:.1f} GiB as float32), more than the {MAX_PARAMETERS:,} "
             "fedmeta builds; use fewer channels or levels.")

    def memory_estimate(self) -> int:
        """Bytes one site needs for a round, an adaptation or a segmentation with this config, about: the weights
        and their adaptation copies (θ, adapted, gradients, optimiser moments: 8 per weight); the round's episodes,
        which ``fedmeta.common.federated_round.site_update`` holds all at once (episodes-per-site x (k-shot +
        q-query) slices: the image, its int64 label and its one-hot target); and the network's activations for the
        largest pass (measured on the UNet: ~11 top-level feature maps per slice backward, ~4 forward) — an
        episode's backward pass (FOMAML batches 4 or more episodes into one), an evaluation support set's, or an
        evaluation batch's forward pass. A pooled (centralised) run holds every site's episodes: this is per site."""
        from fedmeta.common.meta import BATCH_FROM  # torch is loaded by the model import above anyway

        pixels = self.image_size**2
        feature_map = self.model_base_channels * pixels * 4
        episode_slices = self.k_shot + self.q_query
        episodes = self.episodes_per_site * episode_slices * pixels * (4 + 8 + 4 * self.num_classes)
        at_once = self.episodes_per_site if self.algorithm == "fomaml" and self.episodes_per_site >= BATCH_FROM else 1
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
            raise ValueError(f"run-config key(s) {', '.join(map(repr, not_text[:5]))} are not text: keys are kebab-case "
                             "names such as 'inner-lr'.")
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise ValueError(
                f"unknown run-config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(by_key))}."
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
        return "data" if self.algorithm in ("fedavg", "fedprox") else "per-site"

    def quorum(self, sampled: int) -> int:
        """Valid replies after which a round may close at ``round-deadline``: never fewer than min-sites."""
        wanted = math.ceil(self.round_quorum * sampled - 1e-9) if self.round_quorum <= 1 else int(self.round_quorum)
        return min(sampled, max(wanted, self.min_sites, 1))

    @property
    def per_layer_steps(self) -> int:
        """Inner steps with a learned step size each (MAML++ LSLR), or 0 for Meta-SGD's per-element ones."""
        return self.inner_steps if self.step_sizes == "per-layer-step" else 0

    @property
    def adaptation_steps(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.eval_steps.split(",") if s.strip())

    def data_config(self, **changes: Any):
        """How a site's volumes become this run's model inputs (``fedmeta.common.data.DataConfig``)."""
        from fedmeta.common.data import DataConfig  # torch and nibabel only where data is read

        return DataConfig(image_size=(self.image_size, self.image_size), num_classes=self.num_classes,
                          spacing=(self.spacing_mm,) * 3, **changes)

    def model_config(self) -> ModelConfig:
        channels = tuple(self.model_base_channels * 2**i for i in range(self.model_levels))
        return ModelConfig(
            spatial_dims=2,
            in_channels=1,
            out_channels=self.num_classes,
            channels=channels,
            strides=(2,) * (self.model_levels - 1),
            num_res_units=self.model_res_units,
            norm=self.model_norm,
            learner=self.algorithm if self.algorithm in LEARNER_ALGORITHMS else "unet",
            generator_width=self.generator_width,
            embedding_dim=self.prototype_dim,
            lstm_hidden=self.lstm_hidden,
        )

    def trajectory_hash(self, federation: str | None = None) -> str:
        """Hash of every key that shapes the trajectory of θ; a checkpoint resumes only under the same hash.

        ``federation``: a digest of the data a simulation trains on (its manifest's cache key,
        ``fedmeta.common.synth.federation_digest``). Where the federation lies may change between a
        stop and a resume; what it holds may not.
        """
        relevant: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in _NOT_HASHED}
        for key, algorithm in _LEARNER_KEYS.items():  # a learner's sizes shape only that learner's runs
            if self.algorithm not in algorithm:
                relevant.pop(key)
        for key, default in _HASHED_WHEN_SET.items():  # keys added later: at their default, older checkpoints resume
            if relevant.get(key) == default:
                relevant.pop(key)
        if federation is not None:
            relevant["federation"] = federation
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


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
    import os

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
        raise ValueError(f"run config {key}={value!r}: expected true or false.")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"run config {key}={value!r}: expected an integer.")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise ValueError(f"run config {key}={value!r}: expected an integer.") from None
        if not number.is_integer():
            raise ValueError(f"run config {key}={value!r}: expected an integer.")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"run config {key}={value!r}: expected a number.")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"run config {key}={value!r}: expected a number.") from None
    return str(value)


__all__ = ["ALGORITHMS", "DEVICES", "MAX_EPISODES", "MAX_SHOTS", "MAX_STEPS", "META_OPTIMIZERS", "RunConfig",
           "memory_problem"]
