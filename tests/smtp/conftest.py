"""Fixtures for the sans-IO SMTP core tests: a client/server pair past EHLO."""

from __future__ import annotations

import pytest

from pochta.testing.pair import ConnectionPair


@pytest.fixture
def pair() -> ConnectionPair:
    return ConnectionPair.ready()
