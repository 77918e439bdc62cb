"""Types and ranges of the whole config, checked before any stage runs.

Every component is built by ``hydra.utils.instantiate`` from a ``_target_`` node, and its
signature's type hints are the schema of that node: :func:`check_node` checks each given
argument against them (``seed=abc`` is a one-line error naming ``seed``, not a TypeError
deep in a stage). A target may also define ``check_args(**arguments)`` for ranges that are
cheap to check up front; the PPO settings are checked by their own typed schema
(:class:`~detox_exp.ppo.settings.PPOSettings`).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from hydra.utils import get_object

from detox_exp.config_keys import parameter_names, similar_keys, takes
from detox_exp.errors import ConfigError, UnknownKeyError

SKIP = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a plain config value) fits the type hint ``hint``; hints it cannot
    judge (classes such as ``torch.dtype``) accept anything."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, (str, Path))
    base = origin or hint
    if base in (list, tuple, set, Sequence):
        return isinstance(value, (list, tuple))
    if base in (dict, Mapping):
        return isinstance(value, Mapping)
    return True


def describe(hint: Any) -> str:
    """``int | None`` -> 'an integer or null'."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "a path",
        type(None): "null",
    }
    if hint in names:
        return names[hint]
    base = origin or hint
    if base in (list, tuple, set, Sequence):
        return "a list"
    if base in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def check_value(value: Any, hint: Any, field: str) -> None:
    """One-line ConfigError unless ``value`` fits ``hint``."""
    if not matches(value, hint):
        raise ConfigError(
            field, f"must be {describe(hint)}, got {value!r}", f"set {field} to {describe(hint)}"
        )


def type_hints(target: Callable[..., Any]) -> dict[str, Any]:
    """The parameter type hints of a callable (a class: of its ``__init__``), {} if they
    cannot be resolved."""
    candidates = [target.__init__, target] if inspect.isclass(target) else [target]
    for candidate in candidates:  # a dataclass's generated __init__ may not resolve
        try:
            hints = typing.get_type_hints(candidate)
        except Exception:  # an annotation that does not resolve: try the next
            continue
        hints.pop("return", None)
        if hints:
            return hints
    return {}


def check_fields(schema: type, values: Mapping[str, Any], prefix: str) -> None:
    """``values`` against the dataclass ``schema``: an unknown key (UnknownKeyError) or a
    value of the wrong type is a one-line ConfigError naming ``<prefix>.<key>``."""
    hints = type_hints(schema)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        field = f"{prefix}.{unknown[0]}"
        raise UnknownKeyError(field, similar_keys(field, [f"{prefix}.{k}" for k in hints]))
    for key, value in values.items():
        check_value(value, hints[key], f"{prefix}.{key}")


def check_node(node: Mapping[str, Any], field: str) -> None:
    """Check a resolved ``_target_`` node (plain containers): argument names and types
    against the target's signature (a name it does not take is an UnknownKeyError), nested
    ``_target_`` nodes likewise, then the target's ``check_args`` if it has one."""
    try:
        target = get_object(node["_target_"])
    except Exception:
        raise ConfigError(
            f"{field}._target_",
            f"cannot import {node['_target_']!r}",
            "check the spelling, or install the package that provides it",
        ) from None
    hints = type_hints(target)
    for key, value in node.items():
        if key in SKIP:
            continue
        if not takes(target, key):  # instantiate would fail with a TypeError, later
            known = [f"{field}.{k}" for k in parameter_names(target)]
            raise UnknownKeyError(f"{field}.{key}", similar_keys(f"{field}.{key}", known))
        if isinstance(value, Mapping) and "_target_" in value:
            check_node(value, f"{field}.{key}")
            continue
        if isinstance(value, Mapping):  # e.g. eval.judges: nodes by name
            for name, item in value.items():
                if isinstance(item, Mapping) and "_target_" in item:
                    check_node(item, f"{field}.{key}.{name}")
        if key in hints:
            check_value(value, hints[key], f"{field}.{key}")
    check_args = getattr(target, "check_args", None)
    if check_args is not None:
        check_args(**{k: v for k, v in node.items() if k not in SKIP})
