"""The `pochta` command as an operator meets it: the embedded default (no configuration file) and
errors that are one line on stderr with a non-zero exit status, never a traceback.
Imports pytest, the stdlib, `pochta.cli`, `pochta.config` (the default ports), `pochta.store`
and the e2e fixtures.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pochta import cli, config
from pochta.store import open_store
from pochta.testing.node import NodeProcess, wait_port


def pochta(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m pochta ARGS` with no configuration: no -c, no $POCHTA_CONFIG."""
    env = {k: v for k, v in os.environ.items() if k != "POCHTA_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "pochta", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_configless_commands_use_var_in_cwd(tmp_path: Path) -> None:
    result = pochta("domain", "add", "Example.TEST", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    db = tmp_path / "var" / "pochta.db"
    assert db.is_file()

    async def users() -> list[str]:
        store = open_store(f"sqlite:///{db}")
        await store.open()
        try:
            return [u.address for u in await store.list_users()]
        finally:
            await store.close()

    assert asyncio.run(users()) == ["postmaster@example.test"]  # RFC 5321 §4.5.1


def test_configless_serve_answers_on_default_mx_port(tmp_path: Path) -> None:
    listen = config.default_listen()
    ports = [int(a.rpartition(":")[2]) for a in (*listen.mx, *listen.submission)]
    ports += [int(a.rpartition(":")[2]) for a in listen.submissions]
    taken = [p for p in ports if not port_free(p)]
    if taken:
        pytest.skip(f"default port(s) {taken} already in use on this machine")
    env = {k: v for k, v in os.environ.items() if k != "POCHTA_CONFIG"}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pochta", "serve"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    log.close()
    try:
        try:
            wait_port("127.0.0.1", ports[0], timeout=20)
        except OSError:
            pytest.fail("serve did not open the default mx port:\n" + _read(tmp_path))
        with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as s:
            greeting = s.makefile("rb").readline()
            assert greeting.startswith(b"220 ") and b"ESMTP" in greeting, greeting
            s.sendall(b"QUIT\r\n")
        assert (tmp_path / "var" / "pochta.db").is_file()
        assert (tmp_path / "var" / "tls" / "cert.pem").is_file()  # made on first start
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, _read(tmp_path)


def _read(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def node(module_node_factory: Any) -> NodeProcess:
    node: NodeProcess = module_node_factory(
        "cli", start=False, domains=["mail.test"], users={"alice@mail.test": "pw"}
    )
    return node


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr
    assert err.startswith("pochta: error: ") and "\n" not in err, result.stderr
    for word in words:
        assert word in err, err


def test_mail_list_unknown_user(node: NodeProcess) -> None:
    result = node.cli("mail", "list", "ghost@mail.test", check=False)
    assert_one_line_error(result, "ghost@mail.test")


def test_mail_show_missing_message(node: NodeProcess) -> None:
    assert_one_line_error(node.cli("mail", "show", "999", "--raw", check=False), "999")


def test_user_add_without_password_source(node: NodeProcess, store_query: Any) -> None:
    # stdin is not a terminal here and --password-stdin was not given: no way to ask.
    result = subprocess.run(
        node.command("user", "add", "bob@mail.test"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(result, "--password-stdin")
    assert store_query(node, lambda s: s.get_user("bob@mail.test")) is None


def test_bad_toml_stops_serve(tmp_path: Path) -> None:
    path = tmp_path / "pochta.toml"
    path.write_text('hostname = "x.test"\n[limits\n')
    assert_one_line_error(pochta("-c", str(path), "serve", cwd=tmp_path), "pochta.toml")
    assert not (tmp_path / "var").exists()  # nothing was created from a bad configuration


def test_unknown_config_key(tmp_path: Path) -> None:
    path = tmp_path / "pochta.toml"
    path.write_text('hostname = "x.test"\n[limits]\nconections = 5\n')
    result = pochta("-c", str(path), "domain", "list", cwd=tmp_path)
    assert_one_line_error(result, "conections", "limits")


# The variations below run `pochta.cli.main` in this process (a process each would cost a
# second of start-up); the exit status and stderr are the same.
def run_main(capsys: Any, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    capsys.readouterr()
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = cli.main(list(args))
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("user", "add", "alice@mail.test", "--password-stdin"), ("alice@mail.test",)),
        (("user", "add", "x@unhosted.test", "--password-stdin"), ("unhosted.test",)),
        (("user", "add", "not-an-address", "--password-stdin"), ("not-an-address",)),
        (("domain", "add", "mail.test"), ("mail.test",)),
        (("domain", "remove", "nothing.test"), ("nothing.test",)),
        (("alias", "add", "a@mail.test", "ghost@mail.test"), ("ghost@mail.test",)),
    ],
    ids=["user-exists", "domain-not-hosted", "bad-address", "domain-exists", "no-domain", "alias"],
)
def test_store_errors(
    node: NodeProcess, capsys: Any, args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    result = run_main(capsys, "-c", str(node.config), *args, stdin="pw\n")
    assert_one_line_error(result, *words)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('hostname = "x.test"\nhostnme = "typo"\n', ("hostnme",)),
        ('[limits]\nmessage_size = "lots"\n', ("lots",)),
        ('[timeouts]\ncommand = "soon"\n', ("soon",)),
        ("listen = 5\n", ("listen",)),
        ('[store]\nurl = "mysql://x"\n', ("mysql",)),
    ],
    ids=["unknown-key", "bad-size", "bad-duration", "not-a-table", "bad-store-url"],
)
def test_bad_config_file(tmp_path: Path, capsys: Any, text: str, words: tuple[str, ...]) -> None:
    path = tmp_path / "pochta.toml"
    path.write_text(text)
    assert_one_line_error(run_main(capsys, "-c", str(path), "domain", "list"), *words)
    assert not (tmp_path / "var").exists()


def test_missing_config_file(tmp_path: Path, capsys: Any) -> None:
    result = run_main(capsys, "-c", str(tmp_path / "nope.toml"), "domain", "list")
    assert_one_line_error(result, "nope.toml")
