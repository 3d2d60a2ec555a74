"""The store contract (`pochta.testing.storecheck`) run against every engine."""

from __future__ import annotations

import pytest

from pochta.store.api import MailStore
from pochta.testing.storecheck import CHECKS, Check


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
async def test_contract(store: MailStore, check: Check) -> None:
    await check(store)
