"""Reading one mapping of ``params.yaml`` with messages that name the full dotted key.

:class:`Section` is what every params parser (core and analysis sections) uses: typed getters with
defaults and bounds, and :meth:`Section.finish` refusing unknown keys with the allowed ones listed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter value that is missing, of the wrong type or outside the allowed values."""


class Section:
    """Reads one mapping of params.yaml, reporting every problem with its full dotted key."""

    def __init__(self, data: Any, path: str, source: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: {path or 'top level'} must be a mapping, got {data!r}")
        self.data, self.path, self.source = dict(data), path, source
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key(name)} {message}")

    def require_le(self, low: str, low_value: float, high: str, high_value: float) -> None:
        """Refuse ``low_value > high_value`` for two keys of this section, naming both."""
        if low_value > high_value:
            raise ConfigError(
                f"{self.source}: {self.key(low)} ({low_value}) must be <= "
                f"{self.key(high)} ({high_value})"
            )

    def get(self, name: str, default: Any = ...) -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is ...:
                raise self.fail(name, "is required")
            return default
        return self.data[name]

    def section(self, name: str) -> Section:
        return Section(self.get(name, {}), self.key(name), self.source)

    def choice(self, name: str, allowed: Sequence[str], default: Any = ...) -> str:
        value = self.get(name, default)
        if value not in allowed:
            raise self.fail(name, f"must be one of {list(allowed)}, got {value!r}")
        return value

    def number(
        self,
        name: str,
        default: Any = ...,
        lo: float | None = None,
        hi: float | None = None,
        integer: bool = False,
        lo_open: bool = False,
    ) -> Any:
        value = self.get(name, default)
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise self.fail(
                name, f"must be {'an integer' if integer else 'a number'}, got {value!r}"
            )
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise self.fail(name, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise self.fail(name, f"must be <= {hi}, got {value!r}")
        return int(value) if integer else float(value)

    def boolean(self, name: str, default: Any = ...) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {value!r}")
        return value

    def string(self, name: str, default: Any = ..., pattern: re.Pattern[str] | None = None) -> str:
        value = self.get(name, default)
        if not isinstance(value, str) or not value:
            raise self.fail(name, f"must be a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(name, f"has an invalid value {value!r} (expected {pattern.pattern})")
        return value

    def items(self, name: str, parse: Callable[[Any, str], T], default: Any = ...) -> list[T]:
        value = self.get(name, default)
        if not isinstance(value, list) or not value:
            raise self.fail(name, f"must be a non-empty list, got {value!r}")
        return [parse(v, f"{self.key(name)}[{i}]") for i, v in enumerate(value)]

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.source}: unknown key(s) {[self.key(k) for k in unknown]}; "
                f"allowed here: {sorted(self.used)}"
            )


# Declaring a key once: a dataclass field carries its default, a one-line help and its check, and
# read_keys reads every declared field of a params dataclass from its section.


@dataclass(frozen=True)
class Check:
    """How one key is read: its kind (number, integer, choice, flag, string) and bounds."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    allowed: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None

    def read(self, sec: Section, name: str, default: Any) -> Any:
        if self.kind == "choice":
            return sec.choice(name, self.allowed, default)
        if self.kind == "flag":
            return sec.boolean(name, default)
        if self.kind == "string":
            return sec.string(name, default, self.pattern)
        integer = self.kind == "integer"
        return sec.number(name, default, self.lo, self.hi, integer=integer, lo_open=self.lo_open)


def _key(default: Any, help: str, check: Check) -> Any:
    return field(default=default, metadata={"help": help, "check": check})


def number(default: float, help: str, lo=None, hi=None, lo_open: bool = False) -> Any:
    """A float key: ``lo`` <= value (> with ``lo_open``) <= ``hi``."""
    return _key(default, help, Check("number", lo, hi, lo_open))


def integer(default: int, help: str, lo=None, hi=None) -> Any:
    """An integer key within ``[lo, hi]``."""
    return _key(default, help, Check("integer", lo, hi))


def choice(default: str, allowed: Sequence[str], help: str) -> Any:
    """A key whose value is one of ``allowed``."""
    return _key(default, help, Check("choice", allowed=tuple(allowed)))


def text(default: str, help: str, pattern: re.Pattern[str] | None = None) -> Any:
    """A non-empty string key (matching ``pattern``, if given)."""
    return _key(default, help, Check("string", pattern=pattern))


def flag(default: bool, help: str) -> Any:
    """A true / false key."""
    return _key(default, help, Check("flag"))


def read_keys(cls: type, sec: Section, **given: Any) -> dict[str, Any]:
    """Every field of params dataclass ``cls`` declared with a check, read from ``sec`` (default:
    the field's), plus ``given`` (keys the caller parses itself, e.g. from another section)."""
    out = dict(given)
    for f in fields(cls):
        check = f.metadata.get("check")
        if check is not None and f.name not in given:
            out[f.name] = check.read(sec, f.name, f.default)
    return out


def help_of(cls: type) -> dict[str, str]:
    """``{key: help}`` of a params dataclass (what ``params.yaml`` comments say, in one place)."""
    return {f.name: f.metadata["help"] for f in fields(cls) if "help" in f.metadata}
