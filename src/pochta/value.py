"""`Value`: the base of the small immutable records made for every letter (SMTP events, paths,
what the store is given and returns). Stdlib only.

A subclass names its fields in `__match_args__`, sets them once in its own `__init__` (declared
`Final`: mypy refuses any later assignment, and compiled the attribute is read-only) and gets
what a frozen dataclass would give: equality by class and fields, a hash of the fields, a
readable repr and positional `match` patterns. Why not a frozen dataclass: compiled by mypyc
(scripts/build_native.py), a plain class's constructor is a C function taking its arguments
directly, where a dataclass is built through its generated `__init__`, interpreted code that
sets each field through `object.__setattr__`; pochta makes about fifteen such records a letter.
"""

from __future__ import annotations

from typing import ClassVar


class Value:
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__match_args__)

    def __hash__(self) -> int:
        """By its fields, as a frozen dataclass: TypeError when one of them is unhashable."""
        return hash(tuple(getattr(self, f) for f in self.__match_args__))

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__match_args__)
        return f"{type(self).__name__}({args})"
