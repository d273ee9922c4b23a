"""The settings of ``bats search``: :class:`SearchConfig`, every number of the search with the
paper's defaults (§6.1, §4.3; Appendix B for ``--real``) and the checks that tie them together."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from bats_cli.core.config import (
    MAX_BATCH,
    MAX_DECAY,
    MAX_EPOCHS,
    MAX_IMAGE_SIZE,
    MAX_IMAGES,
    MAX_LR,
    Beta,
    RunName,
    RunPlacement,
    Seed,
)
from bats_cli.core.spaces import get_space
from bats_cli.layers.quant import BinarySpec
from bats_cli.utils.preflight import MAX_CHANNELS, MAX_LAYERS, MAX_NODES


def _default_mixed_op() -> str:
    from bats_cli.models.supernet import SupernetConfig

    return SupernetConfig().mixed_op


# A search checkpoint records its stage in 0..64 (bats_cli.storage.metadata.SearchState).
MAX_STAGES = 64
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4


class SearchConfig(RunPlacement):
    """Every number of the search; defaults are the paper's (§6.1, §4.3, Appendix B for --real).
    Where it runs (device, precision, workers, threads; not part of what is searched) is the base's."""

    # data
    dataset: str = "cifar10"  # the paper searches on CIFAR-10 (§6.1)
    data_dir: str | None = None
    download: bool | None = None  # None: fetch torchvision data sets when missing
    subset: int | None = Field(None, ge=4, le=MAX_IMAGES)
    image_size: int | None = Field(None, ge=8, le=MAX_IMAGE_SIZE)
    seed: Seed = 0
    # search space and strategy (§4.1, §4.3, Table 4)
    space: Literal["bats", "darts"] = "bats"
    weights: Literal["real", "binary"] = "real"
    activations: Literal["real", "binary"] = "binary"
    # progressive schedule (§6.1, after P-DARTS)
    layers: tuple[Annotated[int, Field(le=MAX_LAYERS)], ...] = Field((5, 11, 17), max_length=MAX_STAGES)
    ops: tuple[int, ...] = Field((8, 5, 3), max_length=MAX_STAGES)
    epochs: int = Field(25, ge=1, le=MAX_EPOCHS)
    warmup: int = Field(10, ge=0, le=MAX_EPOCHS)
    batch_size: int = Field(96, ge=1, le=MAX_BATCH)
    channels: int = Field(18, ge=2, le=MAX_CHANNELS)
    nodes: int = Field(4, ge=1, le=MAX_NODES)
    channels_per_group: int = Field(3, ge=1, le=MAX_CHANNELS)
    group_policy: Literal["groups", "channels"] = "groups"
    # Ablation switches (§4.1, not the paper's method): shortcut of stride-2 conv ops, shuffle.
    reduce_shortcut: Literal["avgpool", "factorized", "none"] = "avgpool"
    channel_shuffle: int = Field(0, ge=0, le=MAX_CHANNELS)
    activation: Literal["prelu", "relu", "none"] = "prelu"
    # Below 1e-4, α/T overflows float32 once α has moved; above 1e4 softmax is flat whatever α.
    temp_normal: float = Field(0.2, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    temp_reduce: float = Field(0.15, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    # architecture optimiser: Adam (§6.1)
    arch_lr: float = Field(6e-4, gt=0, le=MAX_LR)
    arch_weight_decay: float = Field(1e-3, ge=0, le=MAX_DECAY)
    arch_betas: tuple[Beta, Beta] = (0.5, 0.999)
    # weight optimiser: Adam (§6.1) whatever the search domain (Table 4 keeps it fixed); SGD
    # momentum 0.9, lr 0.1 only when asked for (--optimizer sgd, or the CLI's --real: Appendix B)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float | None = Field(None, gt=0, le=MAX_LR)
    weight_decay: float | None = Field(None, ge=0, le=MAX_DECAY)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, le=1)
    lr_schedule: Literal["constant", "cosine"] | None = None
    lr_min: float = Field(1e-3, ge=0, le=MAX_LR)
    grad_clip: float | None = Field(5.0, gt=0, le=1e9)
    # derivation
    max_skip: int | None = Field(None, ge=0, le=2 * MAX_NODES)
    name: RunName = None
    # implementation
    mixed_op: Literal["fast", "reference"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _strategy_defaults(cls, data: Any) -> Any:
        """Fill what depends on the chosen optimiser: SGD's lr 0.1 and cosine (Appendix B).

        The search domain (--weights / --activations) never changes the optimiser by itself:
        Table 4's rows differ in the domain only.
        """
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("optimizer") is None:
            data["optimizer"] = "adam"
        sgd = data["optimizer"] == "sgd"
        if data.get("lr") is None:
            data["lr"] = 0.1 if sgd else 1e-3
        if data.get("weight_decay") is None:
            data["weight_decay"] = 3e-4
        if data.get("lr_schedule") is None:
            # The paper gives no schedule for Adam (constant); SGD follows DARTS (cosine).
            data["lr_schedule"] = "cosine" if sgd else "constant"
        if data.get("mixed_op") is None:
            data["mixed_op"] = _default_mixed_op()
        return data

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        n_space = len(get_space(self.space).candidates)
        if len(self.layers) != len(self.ops) or not self.layers:
            raise ValueError(
                f"--layers and --ops need one value per stage: got {len(self.layers)} and {len(self.ops)}"
            )
        if any(n < 3 for n in self.layers):
            raise ValueError(
                f"--layers {','.join(map(str, self.layers))}: every stage needs at least 3 cells "
                "(reductions sit at 1/3 and 2/3 of the depth; fewer leave no normal cell to search)"
            )
        if self.ops[0] != n_space:
            raise ValueError(
                f"--ops: the first stage searches all {n_space} ops of the {self.space!r} space, "
                f"got {self.ops[0]}"
            )
        if any(b > a for a, b in zip(self.ops, self.ops[1:])):
            raise ValueError(f"--ops must not grow from stage to stage, got {list(self.ops)}")
        if self.ops[-1] < 2:
            raise ValueError("--ops: the last stage needs at least 2 ops per edge")
        if self.warmup >= self.epochs:
            raise ValueError(
                f"--warmup {self.warmup} leaves no epoch that updates the architecture "
                f"(--epochs {self.epochs})"
            )
        if self.channels % 2:
            raise ValueError(f"--channels {self.channels}: must be even (factorized reduce)")
        if self.space == "bats" and self.channels % self.channels_per_group:
            raise ValueError(
                f"--channels {self.channels} cannot be split into groups of "
                f"{self.channels_per_group} channels; use a multiple of {self.channels_per_group}"
            )
        if self.optimizer == "sgd" and self.lr_schedule == "cosine" and self.lr_min > (self.lr or 0):
            raise ValueError(f"--lr-min {self.lr_min} is above --lr {self.lr}")
        if self.mixed_op not in ("fast", "reference"):
            raise ValueError(f"mixed op must be fast or reference, got {self.mixed_op!r}")
        return self

    @property
    def spec(self) -> BinarySpec:
        return BinarySpec.parse(weights=self.weights, activations=self.activations)

    @property
    def stages(self) -> int:
        return len(self.layers)

    def strategy(self) -> str:
        return f"W {self.weights} / A {self.activations}"
