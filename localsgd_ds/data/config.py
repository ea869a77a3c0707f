"""The loaders' options: how images are decoded and augmented, and by how many processes.

A frozen dataclass, the ``train.data`` block of a run's DeepSpeed JSON, validated in one place::

    "train": {"data": {"num_workers": 8, "image_size": 224, "crop_scale": [0.08, 1.0]}}

``DataConfig.from_dict(block)`` checks every key and names the bad key and value in a
``localsgd_ds.config.ConfigError``; constructing a ``DataConfig`` directly checks the same rules.
Defaults are the ImageNet recipe's (Goyal et al. 2017).

Example::

    options = DataConfig.from_dict(ds_json["train"].get("data", {}))
    loader = train_loader(location, batch_size=32, rank=rank, world_size=8, epoch=0, config=options)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from localsgd_ds.config import ConfigError


def _integer(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _fraction_range(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and 0 < value[0] <= value[1] <= 1
    )


# key: (valid?, what a valid value is)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_workers": (_integer(0), "an integer >= 0"),
    "image_size": (_integer(8), "an integer >= 8"),
    "crop_scale": (_fraction_range, "[low, high] with 0 < low <= high <= 1"),
    "hflip": (lambda v: isinstance(v, bool), "true or false"),
    "val_resize": (_integer(8), "an integer >= 8"),
    "val_crop": (_integer(8), "an integer >= 8"),
    "eval_batch_size": (lambda v: v is None or _integer(1)(v), "null or an integer >= 1"),
}


def _check(values: Mapping[str, Any], where: str) -> None:
    for key, (valid, expected) in _RULES.items():
        if not valid(values[key]):
            raise ConfigError(f"{where}.{key} must be {expected}, got {values[key]!r}")
    if values["val_crop"] > values["val_resize"]:
        raise ConfigError(
            f"{where}.val_crop = {values['val_crop']} is larger than {where}.val_resize = "
            f"{values['val_resize']}: the center crop must fit the resized image"
        )


@dataclass(frozen=True)
class DataConfig:
    """How the loaders decode and augment images (the ``train.data`` block). Defaults: ImageNet."""

    num_workers: int = 8
    """DataLoader processes per rank that read, decode and augment (0: in the training process)."""
    image_size: int = 224
    """Side of the training crop (RandomResizedCrop + horizontal flip), in pixels."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area fraction range of RandomResizedCrop ([0.08, 1] for ImageNet; larger for tiny images)."""
    hflip: bool = True
    """Random horizontal flips of the training crops (off for data where a mirror changes the label)."""
    val_resize: int = 256
    """Validation images are resized to this shorter side, then center-cropped to ``val_crop``."""
    val_crop: int = 224
    """Side of the validation center crop (at most ``val_resize``)."""
    eval_batch_size: int | None = None
    """Validation batch per rank; None: the training micro-batch (``train_micro_batch_size_per_gpu``)."""

    def __post_init__(self) -> None:
        _check({f.name: getattr(self, f.name) for f in fields(self)}, "DataConfig")
        object.__setattr__(self, "crop_scale", (float(self.crop_scale[0]), float(self.crop_scale[1])))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, block: Any, where: str = "train.data") -> DataConfig:
        """Validate a JSON block (missing keys take the defaults); errors name ``where.key`` and the value."""
        if not isinstance(block, Mapping):
            raise ConfigError(f"{where} must be an object with keys {list(cls.keys())}, got {block!r}")
        unknown = sorted(set(block) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {list(cls.keys())}")
        values = {f.name: block.get(f.name, f.default) for f in fields(cls)}
        _check(values, where)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The resolved block, as JSON values (``crop_scale`` as a list)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**values, "crop_scale": list(self.crop_scale)}
