"""One way from an experiment's ``ml_collections`` section to a frozen model dataclass.

Model hyper-parameters are frozen dataclasses (hashable: Linen attributes and jit static args) and
are the ONE source of their defaults; the ``ConfigDict`` section an experiment file edits is derived
from them (``config_dict``), and read back with ``from_config``, which rejects unknown fields with a
did-you-mean hint naming the section (``config.routing.capcity`` -> ``'capacity'``). Nothing here
imports the rest of vlmjax.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections
import numpy as np

T = TypeVar("T")


def _plain(value: Any) -> Any:
    """A dataclass default as a ConfigDict value (dtypes as their names, lists as tuples)."""
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return np.dtype(value).name
    if hasattr(value, "dtype") and hasattr(value, "name") and not isinstance(value, str):
        return str(value.name)
    if isinstance(value, list):
        return tuple(value)
    return value


def field_defaults(cls) -> dict[str, Any]:
    """``{field: default}`` of a dataclass; fields without a default are left out."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = _plain(f.default_factory())  # type: ignore[misc]
    return out


# dataclasses.field(metadata={ANY_TYPE: True}): the ConfigDict field accepts values of any type (e.g.
# ``routing.causal_capacity``: 0.5 or "auto"); a locked ConfigDict otherwise keeps a field's first type.
ANY_TYPE = "config_any_type"


def config_dict(cls, **overrides) -> ml_collections.ConfigDict:
    """The ConfigDict section for dataclass ``cls``: its defaults, then ``overrides``."""
    values = field_defaults(cls)
    unknown_fields(overrides, values, cls.__name__)
    values.update(overrides)
    for f in dataclasses.fields(cls):
        if f.metadata.get(ANY_TYPE) and f.name in values:
            values[f.name] = ml_collections.FieldReference(values[f.name], field_type=object)
    return ml_collections.ConfigDict(values)


def unknown_fields(given: Mapping[str, Any], valid, section: str) -> None:
    """Raises ValueError for keys of ``given`` not in ``valid``, each with a did-you-mean hint."""
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(valid), n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"Unknown {section} field(s): {', '.join(hints)}. Valid fields: {sorted(valid)}.")


def as_dict(cd: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    return cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)


def from_config(cls: type[T], cd: ml_collections.ConfigDict | Mapping[str, Any], section: str,
                *, ignore: tuple[str, ...] = (), **extra) -> T:
    """``cls(**cd, **extra)``: fields missing from ``cd`` keep the dataclass defaults, unknown ones
    are an error naming ``section`` ('config.routing'); keys in ``ignore`` are dropped (instructions
    for the task that share the section, e.g. ``init_from``). Lists become tuples (hashable)."""
    given = {k: v for k, v in as_dict(cd).items() if k not in ignore}
    unknown_fields(given, {f.name for f in dataclasses.fields(cls)}, section)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    given.update(extra)
    return cls(**given)
