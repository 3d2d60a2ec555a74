"""Compile pochta's hot path to C extension modules with mypyc; the source stays the truth.

    .venv/bin/python scripts/build_native.py          # build, unless already up to date
    .venv/bin/python scripts/build_native.py --clean  # remove them: run from source

The modules a letter goes through (the SMTP core, the listener and session policy, the header
and Received: code, the mail log, the SQLite store) are type-checked with mypy --strict, so mypyc
turns them into C extension modules without a change of code: native classes, direct calls and
attribute access where the interpreter would look names up (`bench/README.md` has the
measurements). The extensions are written next to their source (`src/pochta/...*.so`, ignored
by git) with a manifest, `src/pochta/_native.json`, holding a SHA-256 of each compiled source
file. `pochta/__init__.py` checks it at import: when a source file changed after the build,
every compiled module is loaded from its source instead, with a warning, so an edit is never
shadowed by an older build. `scripts/setup.sh` runs this after installing (skip it with
POCHTA_NATIVE=0); a failed build leaves pochta running from source.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "pochta"
MANIFEST = PACKAGE / "_native.json"
BUILD = ROOT / "build" / "native"

# Relative to src/. Only modules on the path of a letter: each one adds build time.
MODULES = [
    "pochta/log.py",
    "pochta/smtp/__init__.py",
    "pochta/smtp/_address.py",
    "pochta/smtp/_connection.py",
    "pochta/smtp/_data.py",
    "pochta/smtp/_errors.py",
    "pochta/smtp/_events.py",
    "pochta/smtp/_grammar.py",
    "pochta/smtp/_replies.py",
    "pochta/smtp/_state.py",
    "pochta/message/__init__.py",
    "pochta/message/headers.py",
    "pochta/message/ids.py",
    "pochta/message/received.py",
    "pochta/server/session.py",
    "pochta/server/listener.py",
    "pochta/store/_common.py",
    "pochta/store/_sqlite_ops.py",
    "pochta/store/_sqlite_writer.py",
    "pochta/store/api.py",
    "pochta/store/sqlite.py",
    "pochta/value.py",
]
# C written by hand (relative to src/, with the module each becomes): the DATA checks no bytes
# method does at memory speed, and WalSync's two system calls of every commit, which ctypes
# made costly. Each has a Python version that runs without a build.
C_MODULES = {
    "pochta/smtp/_scan.c": "pochta.smtp._scan",
    "pochta/store/_aio.c": "pochta.store._aio",
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tool_version() -> str:
    import mypy.version

    return f"mypy {mypy.version.__version__}, {sys.implementation.cache_tag}"


def wanted() -> dict[str, object]:
    """The manifest a build of the current sources would write."""
    return {
        "built_with": _tool_version(),
        "modules": {m: digest(SRC / m) for m in [*MODULES, *C_MODULES]},
    }


def built_files() -> list[Path]:
    """Extension modules of ours under src/ (the per-module ones and mypyc's shared one)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    found = [p for p in PACKAGE.rglob(f"*{suffix}")]
    found += [p for p in SRC.glob(f"*__mypyc{suffix}")]
    return found


def clean() -> None:
    MANIFEST.unlink(missing_ok=True)  # first: without it nothing is taken as a build
    for path in built_files():
        path.unlink()


def up_to_date() -> bool:
    try:
        current = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return False
    return bool(built_files()) and current == wanted()


def build() -> None:
    from mypyc.build import mypycify
    from setuptools import Extension, setup

    clean()
    BUILD.mkdir(parents=True, exist_ok=True)
    manifest = wanted()  # the sources as compiled, read before the compiler starts
    here = Path.cwd()
    os.chdir(SRC)  # extension modules land next to their package's source
    try:
        ext_modules = mypycify(MODULES, opt_level="3", multi_file=True, target_dir=str(BUILD / "c"))
        ext_modules += [
            Extension(name, [path], extra_compile_args=["-O3"])  # -O3: the loops vectorised
            for path, name in C_MODULES.items()
        ]
        setup(
            name="pochta-native",
            ext_modules=ext_modules,
            script_args=[
                "-q",
                "build_ext",
                "--inplace",
                "--build-temp",
                str(BUILD / "obj"),
            ],
        )
    finally:
        os.chdir(here)
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules")
    ap.add_argument("--force", action="store_true", help="build even when up to date")
    args = ap.parse_args()
    if args.clean:
        clean()
        shutil.rmtree(BUILD, ignore_errors=True)
        print("native: removed; pochta runs from source")
        return 0
    if not args.force and up_to_date():
        print(f"native: {len(MODULES) + len(C_MODULES)} compiled modules up to date")
        return 0
    t0 = time.monotonic()
    print(
        f"native: compiling {len(MODULES)} modules with mypyc and {len(C_MODULES)} of C"
        " (a minute or two)...",
        flush=True,
    )
    try:
        build()
    except (Exception, SystemExit) as exc:  # setuptools reports a compiler error as SystemExit
        clean()
        print(f"native: build failed ({exc}); pochta runs from source", file=sys.stderr)
        return 1
    print(
        f"native: {len(MODULES) + len(C_MODULES)} modules compiled in {time.monotonic() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
