"""pochta: a complete mail system in Python (MTA, MSA, mail store and MUA)."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent


class _FromSource:
    """A `sys.meta_path` finder: the listed modules from their .py files, ahead of an
    out-of-date extension; a module written in C is not found at all (`_data.py` then uses
    its Python reference). (Not an `importlib.abc.MetaPathFinder`: importing that module costs
    every pochta command some 20 ms.)"""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self.files.get(fullname)
        if source is None:
            return None
        if source.suffix == ".c":  # no Python source: its importer falls back to the reference
            raise ModuleNotFoundError(f"{fullname}: running from source", name=fullname)
        package = [str(source.parent)] if source.name == "__init__.py" else None
        return importlib.util.spec_from_file_location(
            fullname, source, submodule_search_locations=package
        )


def running_native() -> list[str]:
    """The pochta modules loaded now as compiled extension modules."""
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.startswith("pochta")
        and isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)
    )


def _check_native() -> None:
    """`scripts/build_native.py` compiles the hot modules (and a C helper) next to their source
    and records each source file's SHA-256 in `_native.json`. If any source changed since,
    every compiled module is loaded from source instead (an edit must never be shadowed by an
    older build); likewise when the environment sets POCHTA_NATIVE=0."""
    try:
        manifest = json.loads((_HERE / "_native.json").read_text())
        compiled: dict[str, str] = manifest["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    root = _HERE.parent
    files: dict[str, Path] = {}
    stale = []
    for rel, digest in compiled.items():
        path = root / rel
        name = rel.removesuffix(".py").removesuffix(".c").removesuffix("/__init__")
        name = name.replace("/", ".")
        files[name] = path
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                stale.append(rel)
        except OSError:
            stale.append(rel)
    if os.environ.get("POCHTA_NATIVE") == "0":  # asked for the source (profilers see it)
        sys.meta_path.insert(0, _FromSource(files))
    elif stale:
        sys.meta_path.insert(0, _FromSource(files))
        warnings.warn(
            f"pochta: {stale[0]} changed after its native build: running from source "
            "(scripts/build_native.py rebuilds)",
            RuntimeWarning,
            stacklevel=2,
        )


_check_native()
