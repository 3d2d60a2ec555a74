"""The compiled hot path (scripts/build_native.py): used when it matches its source, never when a
source file changed after the build or POCHTA_NATIVE=0 asks for the source. Each case imports
pochta in a fresh interpreter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pochta

SRC = Path(pochta.__file__).resolve().parents[1]
MANIFEST = SRC / "pochta" / "_native.json"
PROBE = (
    "import pochta, pochta.server.listener, pochta.smtp._connection as c\n"
    "print(c.__file__)\n"
    "print(len(pochta.running_native()))\n"
)

needs_build = pytest.mark.skipif(
    not MANIFEST.exists(), reason="no native build (scripts/build_native.py)"
)


def _probe(src: Path, **env: str) -> tuple[str, int, str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(src), **env},
        cwd=src,
    )
    path, count = out.stdout.split()
    return path, int(count), out.stderr


def _copy_tree(tmp_path: Path) -> Path:
    """src/ with its extension modules and manifest, to change a file without touching ours."""
    dest = tmp_path / "src"
    shutil.copytree(SRC, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


@needs_build
def test_the_build_is_used_when_it_matches_its_source() -> None:
    path, count, err = _probe(SRC)
    compiled = json.loads(MANIFEST.read_text())["modules"]
    assert not path.endswith(".py")
    store = (
        "pochta/store/sqlite",
        "pochta/store/_sqlite_writer",
        "pochta/store/_sqlite_ops",
        "pochta/store/_aio",
    )  # not imported by the probe
    assert count >= len([m for m in compiled if not m.startswith(store)])
    assert "changed after its native build" not in err


@needs_build
def test_an_edited_source_file_is_run_instead_of_an_older_build(tmp_path: Path) -> None:
    src = _copy_tree(tmp_path)
    session = src / "pochta" / "server" / "session.py"
    session.write_text(session.read_text() + "\nEDITED = True\n")
    path, count, err = _probe(src)
    assert path == str(src / "pochta" / "smtp" / "_connection.py")
    assert count == 0
    assert "pochta/server/session.py changed after its native build" in err
    edited = subprocess.run(
        [sys.executable, "-c", "import pochta.server.session as s; print(s.EDITED)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(src)},
        cwd=src,
    )
    assert edited.stdout.strip() == "True"


@needs_build
def test_pochta_native_0_runs_the_source_without_a_warning() -> None:
    path, count, err = _probe(SRC, POCHTA_NATIVE="0")
    assert path.endswith("_connection.py") and count == 0
    assert "changed after its native build" not in err


def test_without_a_build_everything_runs_from_source(tmp_path: Path) -> None:
    src = _copy_tree(tmp_path)
    (src / "pochta" / "_native.json").unlink(missing_ok=True)
    for ext in [*src.rglob("*.so")]:
        ext.unlink()
    path, count, err = _probe(src)
    assert path.endswith("_connection.py") and count == 0 and not err
