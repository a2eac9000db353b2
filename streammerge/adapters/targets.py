"""Which modules a LoRA config adapts, and which rank_pattern / alpha_pattern entry a module takes.

The rules are PEFT's (peft 0.21: how `LoraModel` decides where to put a LoRA layer, and how it
picks a module's rank and alpha), written here as data built once per adapter instead of being
re-read from the config for every module name. tests/test_lora_config.py holds both to the
installed PEFT, on generated configs and on PEFT's own `LoraConfig` objects.

A config says, in this order of precedence:

1. `exclude_modules`: a regex the whole module name must match, or a collection of names, each
   matching that exact name or any name ending in `.<entry>`. An excluded module is never adapted.
2. `modules_to_save`: a module inside a saved module (each entry a regex covering whole dotted
   segments of the name) is never adapted either: it is replaced by its saved copy.
3. `target_modules` unset while `target_parameters` is set: no module is adapted (only parameters).
4. `target_modules` as a string: a regex the whole name must match.
5. `target_modules` as a collection: a name in it is adapted outright; a name ending in `.<entry>`
   is adapted too, unless `layers_to_transform` restricts the layers. Then the layer index is read
   from the name (the numbered segment after a `layers_pattern` match, or without a pattern the
   first numbered segment with two segments before it and one after) and must be the one (an int) or among
   those (a list) given; a name with no readable index is not adapted.

PEFT reads a config's entries only as a module's check reaches them, so an entry it cannot use (a
regex `re` rejects, a value of the wrong type) fails the checks that reach it and no others. The
rules here compile everything up front but keep such a failure and raise it at the same point.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

T = TypeVar("T")


class Targeting(enum.Enum):
    """The config's verdict on one module."""

    TARGETED = "targeted"
    NOT_TARGETED = "not targeted"
    EXCLUDED = "excluded"  # by exclude_modules or modules_to_save, whatever target_modules says

    def __bool__(self) -> bool:
        return self is Targeting.TARGETED


class _Prepared(Generic[T]):
    """Something built from a config entry, or the error building it raised, kept to be raised
    each time the entry is consulted (so a bad entry fails exactly the checks that reach it)."""

    __slots__ = ("_value", "_error")

    def __init__(self, build: Callable[..., T], *args: Any) -> None:
        self._value: T | None = None
        self._error: Exception | None = None
        try:
            self._value = build(*args)
        except Exception as exc:
            self._error = exc

    def get(self) -> T:
        if self._error is not None:
            raise self._error.with_traceback(None)
        return self._value  # type: ignore[return-value]


def _regex(source: str) -> _Prepared[re.Pattern[str]]:
    return _Prepared(re.compile, source)


@dataclass(frozen=True)
class _NameList:
    """A list-valued entry: names matched whole, and the `.<entry>` endings matched as suffixes."""

    whole: frozenset[str]
    endings: tuple[str, ...]

    @classmethod
    def of(cls, entries: Iterable[Any]) -> _NameList:
        entries = list(entries)
        # a module name is a str, so only str entries can equal it; any entry can end it
        return cls(frozenset(e for e in entries if isinstance(e, str)), tuple(f".{e}" for e in entries))

    def names(self, module: str) -> bool:
        return module in self.whole

    def ends(self, module: str) -> bool:
        return module.endswith(self.endings)


def _first_numbered_segment(module: str) -> int | None:
    """The first all-digit segment with at least two segments before it and one after it.

    (PEFT states this as a lazy regex, whose `.` does not match a newline: so a newline in any
    segment before the one that precedes the index rules the index out.)"""
    segments = module.split(".")
    for i in range(2, len(segments) - 1):
        if "\n" in segments[i - 2]:
            return None
        if segments[i].isdecimal():  # the same characters as the regex's \d
            return int(segments[i])
    return None


def _locators(layers_pattern: Any) -> tuple[_Prepared[re.Pattern[str]], ...] | None:
    """Compiled `layers_pattern` entries, in order; None where the pattern is unset or empty."""
    if layers_pattern is None or len(layers_pattern) == 0:
        return None
    names = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    # the entry (a regex) at the start of the name or after its shortest possible dotted prefix,
    # then the index as the next whole segment
    return tuple(_regex(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.") for name in names)


def _saved_patterns(modules_to_save: Any) -> tuple[_Prepared[re.Pattern[str]], ...]:
    """One pattern per `modules_to_save` entry: a module at or under the saved one, the entry (a
    regex) spanning whole dotted segments of the name."""
    return tuple(_regex(rf"(^|.*\.){name}($|\..*)") for name in modules_to_save or ())


@dataclass(frozen=True)
class _LayerFilter:
    """`layers_to_transform`: which layer indices a suffix-matched module may sit in."""

    wanted: Any  # an int, or a container of ints
    locators: _Prepared[tuple[_Prepared[re.Pattern[str]], ...] | None]

    def _index(self, module: str) -> int | None:
        locators = self.locators.get()
        if locators is None:
            return _first_numbered_segment(module)
        for locator in locators:
            found = locator.get().match(module)
            if found is not None:  # the first pattern that matches decides, even without an index
                index = found.group("idx")
                return None if index is None else int(index)
        return None

    def admits(self, module: str) -> bool:
        index = self._index(module)
        if index is None:
            return False
        return index == self.wanted if isinstance(self.wanted, int) else index in self.wanted


@dataclass(frozen=True)
class TargetRules:
    """A config's targeting, prepared once: `decide(module)` for each module name."""

    excluded_by_regex: _Prepared[re.Pattern[str]] | None
    excluded_names: _Prepared[_NameList] | None
    saved: _Prepared[tuple[_Prepared[re.Pattern[str]], ...]]
    parameters_only: bool
    target_regex: _Prepared[re.Pattern[str]] | None
    target_names: _Prepared[_NameList] | None
    layers: _LayerFilter | None

    @classmethod
    def from_config(cls, config: Any) -> TargetRules:
        """From a `LoraSettings` or a `peft.LoraConfig` (only attributes are read)."""
        exclude = getattr(config, "exclude_modules", None)
        target = getattr(config, "target_modules", None)
        indexes = getattr(config, "layers_to_transform", None)
        restricts = indexes is not None and not (isinstance(indexes, list) and len(indexes) == 0)
        literal_targets = not isinstance(target, str)
        return cls(
            excluded_by_regex=_regex(exclude) if exclude and isinstance(exclude, str) else None,
            excluded_names=_Prepared(_NameList.of, exclude) if exclude and not isinstance(exclude, str) else None,
            saved=_Prepared(_saved_patterns, getattr(config, "modules_to_save", None)),
            parameters_only=target is None and getattr(config, "target_parameters", None) is not None,
            target_regex=None if literal_targets else _regex(target),
            # target_modules None without target_parameters is unusable: PEFT fails on it, and so does this
            target_names=_Prepared(_NameList.of, target) if literal_targets else None,
            layers=(_LayerFilter(indexes, _Prepared(_locators, getattr(config, "layers_pattern", None)))
                    if restricts and literal_targets else None),
        )

    def _excluded(self, module: str) -> bool:
        if self.excluded_by_regex is not None and self.excluded_by_regex.get().fullmatch(module):
            return True
        if self.excluded_names is not None:
            names = self.excluded_names.get()
            if names.names(module) or names.ends(module):
                return True
        return any(pattern.get().match(module) for pattern in self.saved.get())

    def decide(self, module: str) -> Targeting:
        if self._excluded(module):
            return Targeting.EXCLUDED
        if self.parameters_only:
            return Targeting.NOT_TARGETED
        if self.target_regex is not None:
            hit = self.target_regex.get().fullmatch(module) is not None
        else:
            names = self.target_names.get()  # type: ignore[union-attr]
            hit = names.names(module) or (
                names.ends(module) and (self.layers is None or self.layers.admits(module))
            )
        return Targeting.TARGETED if hit else Targeting.NOT_TARGETED


@dataclass(frozen=True)
class PatternTable:
    """rank_pattern or alpha_pattern: the first key, in the mapping's order, that matches a module's
    whole name or a dotted ending of it (the key read as a regex) gives that module its value."""

    keys: tuple[str, ...]
    _patterns: tuple[_Prepared[re.Pattern[str]], ...]

    @classmethod
    def of(cls, keys: Iterable[str] | None) -> PatternTable:
        keys = tuple(keys or ())
        # group structure as PEFT builds it, so a key's own groups number the same way
        return cls(keys, tuple(_regex(rf"(.*\.)?({key})$") for key in keys))

    def key_for(self, module: str) -> str:
        """The key that applies to `module`; the module's own name when none does (PEFT's answer,
        which a lookup in the mapping then normally misses)."""
        for key, pattern in zip(self.keys, self._patterns):
            if pattern.get().match(module):
                return key
        return module

    def value_for(self, mapping: Mapping[str, Any] | None, module: str, default: Any) -> Any:
        return (mapping or {}).get(self.key_for(module), default)
