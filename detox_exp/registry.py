"""Registries of named pure functions (verl-style): an estimator is registered once, with its
name and its properties, and the config checks, the docs tables and the search space read the
registry instead of repeating its names.

    ADVANTAGE_ESTIMATORS = Registry("ppo.advantage_estimator")

    @ADVANTAGE_ESTIMATORS.register("rloo", needs_critic=False)
    def rloo(...): ...

    ADVANTAGE_ESTIMATORS["rloo"].fn(...)          # the function
    ADVANTAGE_ESTIMATORS["rloo"].needs_critic     # a property given at registration
    ADVANTAGE_ESTIMATORS.names(needs_critic=False)  # ('rloo', ...) in registration order
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered function and the properties it was registered with."""

    name: str
    fn: Callable[..., Any]
    properties: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.properties[key]
        except KeyError:
            raise AttributeError(f"{self.name} has no property {key!r}") from None


class Registry:
    """Functions by name for the config field ``field`` (e.g. ``ppo.loss_agg_mode``)."""

    def __init__(self, field: str) -> None:
        self.field = field
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **properties: Any) -> Callable[[Callable], Callable]:
        """Decorator: register the function under ``name`` with ``properties``; returns the
        function unchanged. A name registered twice is an error."""

        def add(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.field}: {name!r} is registered twice")
            self._entries[name] = Entry(name, fn, dict(properties))
            return fn

        return add

    def names(self, **where: Any) -> tuple[str, ...]:
        """The registered names (in registration order) whose properties equal ``where``."""
        return tuple(
            e.name for e in self if all(e.properties.get(k) == v for k, v in where.items())
        )

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            raise ValueError(f"{self.field}: unknown {name!r}, use one of {self.names()}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def markdown(self, columns: dict[str, str]) -> str:
        """A docs table: the name, then one column per property (``{property: header}``),
        then the first line of the function's docstring."""
        heads = ["name", *columns.values(), "what it computes"]
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for e in self:
            summary = " ".join((e.fn.__doc__ or "").split("\n\n")[0].split())
            summary = summary.replace("``", "`").replace("|", "\\|")
            cells = [f"`{e.name}`", *(_cell(e.properties.get(k)) for k in columns), summary]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)
