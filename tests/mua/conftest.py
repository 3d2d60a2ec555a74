"""Fixtures of the MUA tests: one real `pochta serve` node shared by a module (mx, submission,
submissions on its own loopback address, free ports); helpers live in `mua_helpers`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from mua_helpers import ALICE, HOSTNAME, PASSWORDS, SAFE_DNS, SALES

from pochta.auth.passwords import hash_password
from pochta.store import open_store
from pochta.testing.node import NodeProcess


async def provision(node: NodeProcess) -> None:
    """What `pochta domain add`, `user add` and `alias add` do, in one store session."""
    store = open_store(f"sqlite:///{node.db}")
    await store.open()
    try:
        await store.add_domain("mua.test")
        for address, password in PASSWORDS.items():
            await store.add_user(address, *hash_password(password))
        await store.add_alias(SALES, ALICE)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    host = f"127.0.251.{2 + os.getpid() % 250}"
    n = NodeProcess.create(
        tmp_path_factory.mktemp("mua") / "node", host=host, hostname=HOSTNAME, extra_toml=SAFE_DNS
    )
    asyncio.run(provision(n))
    n.start()
    yield n
    n.stop()
    print(n.log_text()[-4000:])
