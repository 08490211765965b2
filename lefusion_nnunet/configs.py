"""One mechanism for configuration dataclasses <-> JSON: the :class:`JsonConfig` mixin.

Every config of the package (model, schedule, sampler, training, data, ROI, intensity space, variant and trainer
settings, phantoms) is a frozen dataclass that inherits :class:`JsonConfig`: ``to_dict()`` gives plain JSON types
(tuples become lists, nested configs dicts, numpy values Python numbers) and ``from_dict()`` is its inverse,
directed by the field annotations (lists back to tuples, dicts back to nested configs, ints to floats where a
float is declared). Unknown keys are refused with one sentence; missing keys take the field's default, so files
written by an older version with fewer fields still load. Validation stays in each class's ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

import numpy as np

from lefusion_nnunet.errors import LeFusionInputError


def plain(value: Any) -> Any:
    """``value`` as plain JSON types (configs and dataclasses -> dicts, tuples -> lists, numpy -> Python)."""
    if isinstance(value, JsonConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _revive(hint: Any, value: Any) -> Any:
    """A JSON value back to the type a field declares (only where JSON loses the type)."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _revive(options[0], value) if len(options) == 1 else value
    if isinstance(hint, type) and issubclass(hint, JsonConfig) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_revive(args[0], v) for v in value)
        return tuple(_revive(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class JsonConfig:
    """Mixin for (frozen) dataclass configs: :meth:`to_dict` / :meth:`from_dict` through JSON-safe dicts.

    ``config_title`` names the config in error messages (default: the class name).
    """

    config_title: typing.ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types, in field order."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`~lefusion_nnunet.errors.LeFusionInputError`."""
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise LeFusionInputError(f"unknown {cls.config_title or cls.__name__} key(s) {unknown}; valid keys are "
                                     f"{names} (the file may come from a newer lefusion-nnunet).")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _revive(hints.get(k), v) for k, v in d.items()})
