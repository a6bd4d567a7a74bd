"""One registry helper for every plugin kind: adapters, MIL models, strategies, readers, detectors, decoders, encoders.

A plugin registers where it is defined (``@ADAPTERS.register("salt", conv=True, identity_at_init=True)``, like
timm's ``@register_model``), and its capabilities live on its :class:`Entry`, so pipelines ask the entry
(``ADAPTERS.entry(name).caps["conv"]``, ``ADAPTERS.names(conv=True)``) instead of keeping lists of names. Test
matrices iterate :meth:`Registry.names`, so a new plugin is covered by the tests the moment it registers.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pathopeft.errors import UserError

T = TypeVar("T")


class UnknownPluginError(UserError, KeyError, ValueError):
    """A name that is not registered; the message lists the known names and close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered plugin: its name, the object (class or factory) and its declared capabilities."""

    name: str
    obj: T
    caps: dict[str, Any] = field(default_factory=dict)

    def supports(self, capability: str) -> bool:
        return bool(self.caps.get(capability, False))


class Registry(Generic[T]):
    """Named plugins of one kind, in registration order; names are case-insensitive and registered once."""

    def __init__(self, kind: str, capabilities: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.defaults = dict(capabilities or {})  # every capability an entry can declare, with its default
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, obj: T, **caps: Any) -> T:
        key = name.lower()
        unknown = set(caps) - set(self.defaults)
        if self.defaults and unknown:
            raise TypeError(
                f"{self.kind} {key!r}: unknown capabilities {sorted(unknown)}; known {sorted(self.defaults)}"
            )
        if key in self._entries and self._entries[key].obj is not obj:
            raise ValueError(f"{self.kind} {key!r} is already registered ({self._entries[key].obj!r})")
        self._entries[key] = Entry(key, obj, {**self.defaults, **caps})
        return obj

    def register(self, name: str | None = None, **caps: Any) -> Callable[[T], T]:
        """Decorator: register the class or function under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            return self.add(name or obj.__name__, obj, **caps)  # type: ignore[attr-defined]

        return deco

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name.lower()]
        except KeyError:
            known = list(self._entries)
            close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownPluginError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known)})") from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def remove(self, name: str) -> Entry[T]:
        """Unregister ``name`` and return its entry, so a test can add a toy plugin and leave no trace."""
        return self._entries.pop(self.entry(name).name)

    def names(self, **caps: Any) -> list[str]:
        """Registered names whose capabilities equal every given value (``names(conv=True)``)."""
        return [n for n, e in self._entries.items() if all(e.caps.get(k) == v for k, v in caps.items())]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
