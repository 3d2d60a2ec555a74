"""`pochta demo`: two domains on loopback, a letter from alice@mail.test to bob@yandex.test, the
reply, and a bounce, narrated step by step; then both nodes keep running until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from pochta import app, config
from pochta.auth.passwords import hash_password
from pochta.client.session import SmtpClient
from pochta.errors import ConfigError
from pochta.store.api import INBOX, SENT, MailStore

DOMAINS = (("mail.test", "127.0.0.2", "alice"), ("yandex.test", "127.0.0.3", "bob"))
PASSWORD = "demo-password"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", help="two domains on loopback sending each other mail")
    p.add_argument("--dir", help="where the two nodes keep their data (default: a temporary dir)")
    p.add_argument("--exit", action="store_true", help="stop after the walk-through")
    p.set_defaults(func=cmd_demo)


def say(text: str = "") -> None:
    print(text, flush=True)


def node_config(
    root: Path, domain: str, address: str, ports: tuple[int, int, int]
) -> config.Config:
    mx, sub, subs = ports
    routes = {d: [f"{a}:{mx}"] for d, a, _ in DOMAINS}
    data = {
        "hostname": f"mx.{domain}",
        "data_dir": str(root / domain),
        "listen": {
            "mx": [f"{address}:{mx}"],
            "submission": [f"{address}:{sub}"],
            "submissions": [f"{address}:{subs}"],
        },
        "dns": {"routes": routes},
        "delivery": {"port": mx, "poll": 0.5},
        "queue": {"retry": ["5s", "30s"], "warn_after": ""},
    }
    return config.from_dict(data, source=str(root / f"{domain}.toml"))


def cmd_demo(args: argparse.Namespace) -> int:
    root = Path(args.dir or tempfile.mkdtemp(prefix="pochta-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ports = (25, 587, 465) if os.geteuid() == 0 else (2525, 2587, 2465)
    cfgs = [node_config(root, d, a, ports) for d, a, _ in DOMAINS]
    try:
        return int(app.run(_demo(cfgs, root, ports, args.exit)))
    except OSError as exc:
        raise ConfigError(f"cannot start the demo nodes: {exc}") from None


async def _demo(cfgs: list[config.Config], root: Path, ports: tuple[int, ...], once: bool) -> int:
    nodes = [app.Node(cfg) for cfg in cfgs]
    say(f"pochta demo: two mail domains on this machine, data in {root}")
    try:
        for node, (domain, address, user) in zip(nodes, DOMAINS, strict=True):
            await node.start()
            assert node.store is not None
            await _provision(node.store, domain, user)
            say(
                f"  {domain:12} MX {address}:{ports[0]}, submission {address}:{ports[1]} "
                f"(STARTTLS) and {address}:{ports[2]} (TLS); user {user}@{domain}"
            )
        say("  (the nodes find each other through [dns.routes]; in production, MX records)\n")
        await _walkthrough(nodes, cfgs)
        if once:
            return 0
        _how_to_connect(ports)
        await _wait_for_ctrl_c()
        return 0
    finally:
        for node in nodes:
            await node.stop()


async def _provision(store: MailStore, domain: str, user: str) -> None:
    if not await store.hosts_domain(domain):
        await store.add_domain(domain)
    if await store.get_user(f"{user}@{domain}") is None:
        encoded, scram = await asyncio.to_thread(hash_password, PASSWORD)
        await store.add_user(f"{user}@{domain}", encoded, scram)


async def _walkthrough(nodes: list[app.Node], cfgs: list[config.Config]) -> None:
    mail, yandex = (n.store for n in nodes)
    assert mail is not None and yandex is not None
    say("1. alice@mail.test writes to bob@yandex.test through her own server (587, STARTTLS, AUTH)")
    await _submit(
        cfgs[0],
        "alice@mail.test",
        "bob@yandex.test",
        "Hello Bob",
        "Hi Bob,\r\n\r\nthis letter crossed from mail.test to yandex.test.\r\n",
    )
    await _show(mail, "alice@mail.test", SENT, "   alice's Sent folder on mail.test:")
    await _wait_for(yandex, "bob@yandex.test", INBOX, 1)
    await _show(
        yandex,
        "bob@yandex.test",
        INBOX,
        "   mail.test looked up yandex.test and delivered over port 25; bob's INBOX:",
    )
    say("\n2. bob replies")
    await _submit(
        cfgs[1],
        "bob@yandex.test",
        "alice@mail.test",
        "Re: Hello Bob",
        "Hi Alice,\r\n\r\ngot it, thanks!\r\n",
    )
    await _wait_for(mail, "alice@mail.test", INBOX, 1)
    await _show(mail, "alice@mail.test", INBOX, "   alice's INBOX on mail.test:")
    say("\n3. alice writes to nobody@yandex.test, who does not exist")
    await _submit(cfgs[0], "alice@mail.test", "nobody@yandex.test", "Are you there?", "Hello?\r\n")
    say("   mail.test cannot know that in advance; yandex.test answers 550 5.1.1 at RCPT time,")
    say("   so mail.test sends a bounce (RFC 3464 delivery status notification) to alice:")
    await _wait_for(mail, "alice@mail.test", INBOX, 2)
    await _show(mail, "alice@mail.test", INBOX, "   alice's INBOX on mail.test:")
    say()


async def _submit(cfg: config.Config, sender: str, rcpt: str, subject: str, text: str) -> None:
    host, _, port = cfg.listen.submission[0].rpartition(":")
    context = ssl.create_default_context(cafile=str(cfg.path("tls/cert.pem")))
    client = await SmtpClient.connect(host, int(port), helo_name="demo.client")
    try:
        await client.starttls(context, cfg.hostname)
        await client.auth(sender, PASSWORD)
        body = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n{text}").encode()
        result = await client.send(sender, [rcpt], body)
        for r in result.recipients:
            say(f"   {cfg.hostname} answered for {r.address}: {r.reply}")
    finally:
        await client.quit()


async def _wait_for(store: MailStore, address: str, folder: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(await store.list_messages(address, folder)) < count:
        if time.monotonic() > deadline:
            say(f"   (still waiting for {address}/{folder}; see `pochta queue list`)")
            return
        await asyncio.sleep(0.2)


async def _show(store: MailStore, address: str, folder: str, title: str) -> None:
    say(title)
    for m in await store.list_messages(address, folder):
        say(f"     #{m.id}  from {m.from_ or '<>'}  subject {m.subject!r}  ({m.size} bytes)")


def _how_to_connect(ports: tuple[int, ...]) -> None:
    say("Both nodes keep running. Try, for example:")
    say(
        f"  swaks --server 127.0.0.2:{ports[1]} -tls --auth-user alice@mail.test "
        f"--auth-password {PASSWORD} --from alice@mail.test --to bob@yandex.test"
    )
    say(f"  swaks --server 127.0.0.3:{ports[0]} --from someone@else.test --to bob@yandex.test")
    say("Press Ctrl-C to stop.")


async def _wait_for_ctrl_c() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
