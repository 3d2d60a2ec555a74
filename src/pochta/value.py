"""`Value`: the base of the small immutable records made for every letter (SMTP events, paths,
what the store is given and returns). Stdlib only.

A subclass names its fields in `__match_args__`, sets them once in its own `__init__` (declared
`Final`, so mypy refuses any later assignment) and gets equality by class and fields and a
readable repr, as a frozen dataclass would give. Why not a frozen dataclass: compiled by mypyc
(scripts/build_native.py), a plain class's constructor is a C function taking its arguments
directly, where a dataclass is built through its generated `__init__`, interpreted code that
sets each field through `object.__setattr__`; pochta makes about fifteen such records a letter.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Value:
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__match_args__)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__: Any = None  # like a mutable dataclass; a hashable subclass defines its own

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__match_args__)
        return f"{type(self).__name__}({args})"
