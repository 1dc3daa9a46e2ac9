"""The shared segmentation model: a MONAI UNet built from a frozen config, and its head for ANIL."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from monai.networks.nets import UNet

from fedmeta.common.algorithms import NETWORKS
from fedmeta.common.unet import head_parameter_names

VALID_NORMS = ("instance", "group")
# The UNet alone (the initialisation family), or the UNet with a learner's own parts (fedmeta.common.algorithms).
VALID_LEARNERS = ("unet", *NETWORKS)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the shared initialisation.

    Layout of inputs and outputs: ``BCHW`` for ``spatial_dims=2``, ``BCHWD`` for 3.
    """

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 4  # background, CSF, grey matter, white matter
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    norm: str = "instance"
    groups: int = 4  # only for norm="group"
    dropout: float = 0.0
    learner: str = "unet"  # unet | fast-weights | prototypes | lstm-optimizer
    generator_width: int = 32  # fast-weights: channels of the support-set encoder and its MLP
    embedding_dim: int = 32  # prototypes: channels of the pixel embedding
    lstm_hidden: int = 8  # lstm-optimizer: hidden units of the coordinate-wise LSTM

    def __post_init__(self) -> None:
        # Accept lists (from TOML/JSON) but store tuples so the config stays hashable.
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        norm = str(self.norm).lower()
        if norm in ("batch", "batchnorm", "bn", "sync_batch", "syncbatch"):
            raise ValueError(
                f"norm={self.norm!r} is refused: BatchNorm keeps running statistics that it updates in "
                "place, which silently breaks the MAML inner loop (adapted parameters share one set of "
                "statistics) and torch.func.vmap over episodes. Use norm='instance' or norm='group'."
            )
        if norm not in VALID_NORMS:
            raise ValueError(f"norm={self.norm!r} is not supported; valid choices: {', '.join(VALID_NORMS)}.")
        object.__setattr__(self, "norm", norm)
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={self.spatial_dims} is not supported; use 2 (slices) or 3 (patches).")
        if len(self.channels) < 2:
            raise ValueError(f"channels={self.channels} needs at least two levels, e.g. (16, 32, 64, 128).")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides={self.strides} must have one entry fewer than channels={self.channels} "
                f"(got {len(self.strides)} and {len(self.channels)})."
            )
        if any(c <= 0 for c in self.channels) or any(s <= 0 for s in self.strides):
            raise ValueError(f"channels={self.channels} and strides={self.strides} must be positive.")
        if norm == "group":
            # MONAI normalises the top up-sampling output too (out_channels) when residual units are on.
            normed = self.channels + ((self.out_channels,) if self.num_res_units > 0 else ())
            if self.groups <= 0 or any(c % self.groups for c in normed):
                raise ValueError(
                    f"norm='group' with groups={self.groups} needs every normalised width {normed} "
                    "(channels, and out_channels when num_res_units > 0) to be divisible by groups; "
                    "change groups or channels."
                )
        if self.learner not in VALID_LEARNERS:
            raise ValueError(f"learner={self.learner!r} is not supported; valid choices: {', '.join(VALID_LEARNERS)}.")
        for name in ("generator_width", "embedding_dim", "lstm_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        if self.in_channels <= 0 or self.out_channels < 2:
            raise ValueError(
                f"in_channels={self.in_channels} must be >= 1 and out_channels={self.out_channels} >= 2 "
                "(background plus at least one structure)."
            )

    @property
    def downsample_factor(self) -> int:
        """Image sides must be divisible by this for the skip connections to line up."""
        factor = 1
        for s in self.strides:
            factor *= s
        return factor


def build_model(config: ModelConfig | None = None) -> UNet:
    """Builds the MONAI UNet described by ``config`` (default: the 2D model); with ``config.learner`` set, the
    UNet subclass of that family (:mod:`fedmeta.common.algorithms`), whose extra parts are parameters too."""
    config = config or ModelConfig()
    if config.norm == "group":
        norm: tuple | str = ("group", {"num_groups": config.groups})
    else:
        # affine=False (MONAI's default): no parameters, so nothing in the norm is meta-learned.
        norm = "instance"
    unet = dict(
        spatial_dims=config.spatial_dims,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        norm=norm,
        dropout=config.dropout,
    )
    if config.learner == "unet":
        return UNet(**unet)
    return NETWORKS[config.learner].from_model_config(config, **unet)


@functools.lru_cache(maxsize=64)
def parameter_count(config: ModelConfig) -> int:
    """How many parameters ``config``'s network has, counted on torch's meta device: nothing is allocated, so a
    config asking for billions of weights is measured in milliseconds before anyone builds it."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(config).parameters())


def unet_of(config: ModelConfig) -> ModelConfig:
    """The plain UNet a learner is built on: ``config`` without the learner and its parts' sizes."""
    plain = ModelConfig()
    return dataclasses.replace(config, learner="unet", generator_width=plain.generator_width,
                               embedding_dim=plain.embedding_dim, lstm_hidden=plain.lstm_hidden)


def initial_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as a detached dict: the θ that meta-learning starts from."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def seeded_model(config: ModelConfig, seed: int) -> UNet:
    """Builds the model with weights drawn from ``seed`` alone, whatever the global RNG did before."""
    devices = []  # fork_rng on CPU only: CUDA state is not touched by the CPU initialiser.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return build_model(config)


__all__ = [
    "ModelConfig",
    "VALID_LEARNERS",
    "VALID_NORMS",
    "build_model",
    "head_parameter_names",
    "initial_params",
    "seeded_model",
    "unet_of",
]

