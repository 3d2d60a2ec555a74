"""A private Postfix instance for interop tests: its own config, queue, data and Maildir directories
under one test directory, listening on one loopback address. Production code never imports this
module. Imports stdlib, `pochta.tls` (the self-signed certificate) and `pochta.testing.node`.

    postfix = PostfixInstance(Path(tempfile.mkdtemp()), address="127.0.0.4",
                              relay_routes={"mail.test": "[127.0.0.5]:25"})
    with postfix:                      # start() ... stop(), also when the test fails
        smtplib.SMTP("127.0.0.4", 25).sendmail(...)
        postfix.maildir_messages("carol")

Nothing here touches /etc/postfix: every command runs with `-c <directory>/etc`. The instance
cannot send mail anywhere but loopback: `relayhost` is empty, every route in `transport_maps`
must be a bracketed 127.0.0.0/8 address (checked here), `default_transport`, `relay_transport`
and `local_transport` are `error:`, and no DNS is ever asked (no client name lookups, no MX
lookups). Its users live in a virtual mailbox domain, so unknown recipients are refused at RCPT
with 550 5.1.1 (`smtpd_reject_unlisted_recipient`). Starting it needs root (Postfix's master),
and the postfix user must be able to traverse every parent of `directory`: Postfix opens lock
files and Maildirs by absolute path after dropping root, so pytest's `tmp_path` (under a mode
0700 directory) does not work; `start()` says so instead of failing obscurely.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from pochta.testing.node import wait_port
from pochta.tls import ensure_self_signed

SBIN = Path("/usr/sbin")
_FORBIDDEN = "pochta test instance: no delivery beyond loopback"

# Debian's master.cf without chroot (the queue lives in a test directory, not /var/spool) and
# without the local, lmtp and pipe services, which this instance never uses.
_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_command(name: str = "postfix") -> str | None:
    """The path of a Postfix command (`postfix`, `postconf`, `postqueue`), or None."""
    found = shutil.which(name)
    if found:
        return found
    candidate = SBIN / name
    return str(candidate) if candidate.exists() else None


def missing_reason() -> str | None:
    """Why Postfix cannot be used here (not installed), or None when it can."""
    if postfix_command("postfix") is None or postfix_command("postconf") is None:
        return "Postfix is not installed (no postfix/postconf in PATH or /usr/sbin)"
    return None


def loopback_route(route: str) -> str:
    """`[127.0.0.5]:25` or `[127.0.0.5]` checked to be a loopback address literal; returns the
    Postfix nexthop `smtp:[127.0.0.5]:25`. Anything else (a name, a public address) raises
    ValueError, so the instance can never look up or reach a host beyond 127.0.0.0/8."""
    if not route.startswith("[") or "]" not in route:
        raise ValueError(f"route {route!r} is not a bracketed address literal like [127.0.0.5]:25")
    host, _, rest = route[1:].partition("]")
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        raise ValueError(f"route {route!r}: bad port")
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"route {route!r} is not a loopback address")
    return f"smtp:{route}"


class PostfixInstance:
    """One Postfix 3.x instance with every directory under `directory`."""

    def __init__(
        self,
        directory: Path,
        *,
        address: str = "127.0.0.4",
        port: int = 25,
        hostname: str = "mx.postfix.test",
        domain: str = "postfix.test",
        users: Iterable[str] = ("carol",),
        relay_routes: Mapping[str, str] | None = None,
    ) -> None:
        if not ipaddress.ip_address(address).is_loopback:
            raise ValueError(f"{address} is not a loopback address")
        routes = {"mail.test": "[127.0.0.5]:25"} if relay_routes is None else dict(relay_routes)
        self.transport = {name: loopback_route(route) for name, route in routes.items()}
        self.directory = directory.resolve()
        self.address = address
        self.port = port
        self.hostname = hostname
        self.domain = domain
        self.users = tuple(users)
        self.running = False

    # Paths -------------------------------------------------------------------------------------
    @property
    def config_directory(self) -> Path:
        return self.directory / "etc"

    @property
    def queue_directory(self) -> Path:
        return self.directory / "spool"

    @property
    def mail_directory(self) -> Path:
        """virtual_mailbox_base: `<domain>/<user>/` Maildirs."""
        return self.directory / "mail"

    @property
    def maillog(self) -> Path:
        return self.directory / "maillog"

    @property
    def cert(self) -> Path:
        return self.directory / "tls" / "cert.pem"

    @property
    def key(self) -> Path:
        return self.directory / "tls" / "key.pem"

    def maildir(self, user: str) -> Path:
        return self.mail_directory / self.domain / user

    # Configuration -----------------------------------------------------------------------------
    def settings(self) -> dict[str, str]:
        """main.cf, one parameter each."""
        uid, gid = self._delivery_owner()
        etc = self.config_directory
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.directory / "lib"),
            "myhostname": self.hostname,
            "mydomain": self.domain,
            "myorigin": "$mydomain",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            # Postfix refuses an inet_interfaces address that no interface carries (127.0.0.4
            # is only routed to lo); master.cf names the listening address:port instead.
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "smtp_bind_address": self.address,
            # Nothing may leave loopback: no smarthost, every other destination is an error.
            "relayhost": "",
            "relay_domains": "",
            "default_transport": f"error:{_FORBIDDEN}",
            "relay_transport": f"error:{_FORBIDDEN}",
            "local_transport": "error:local delivery is disabled",
            "transport_maps": f"texthash:{etc / 'transport'}",
            "alias_maps": "",
            "alias_database": "",
            # No DNS at all: no reverse lookups of clients, no MX/A lookups for nexthops.
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            # Users: a virtual mailbox domain delivering to Maildir (trailing "/" in the map).
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_maps": f"texthash:{etc / 'vmailbox'}",
            "virtual_mailbox_base": str(self.mail_directory),
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            # Unknown users: 550 5.1.1 at RCPT (RFC 5321 §4.2.2, RFC 3463 §3.2 bad mailbox).
            "smtpd_reject_unlisted_recipient": "yes",
            # TLS both ways, opportunistic (RFC 3207 STARTTLS), logged so tests can see it.
            "smtpd_tls_cert_file": str(self.cert),
            "smtpd_tls_key_file": str(self.key),
            "smtpd_tls_security_level": "may",
            "smtp_tls_security_level": "may",
            "smtpd_tls_loglevel": "1",
            "smtp_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            # Logging to a file, fast retries, quick timeouts for tests.
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.directory),
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtpd_banner": "$myhostname ESMTP Postfix",
        }

    def write_config(self) -> None:
        """main.cf, master.cf, the transport and virtual mailbox tables, the certificate."""
        etc = self.config_directory
        etc.mkdir(parents=True, exist_ok=True)
        self.queue_directory.mkdir(mode=0o755, exist_ok=True)
        self.mail_directory.mkdir(mode=0o755, exist_ok=True)
        uid, gid = self._delivery_owner()
        os.chown(self.mail_directory, uid, gid)
        main = "".join(f"{key} = {value}\n" for key, value in self.settings().items())
        (etc / "main.cf").write_text(main)
        listener = f"{self.address}:{self.port} inet n - n - - smtpd\n"
        (etc / "master.cf").write_text(listener + _SERVICES)
        transport = "".join(f"{name} {nexthop}\n" for name, nexthop in self.transport.items())
        (etc / "transport").write_text(transport)
        boxes = "".join(f"{u}@{self.domain} {self.domain}/{u}/\n" for u in self.users)
        (etc / "vmailbox").write_text(boxes)
        ensure_self_signed(self.cert, self.key, self.hostname)

    def _delivery_owner(self) -> tuple[int, int]:
        """The uid/gid of `mail_owner` (postfix): the Postfix daemons and the virtual delivery
        agent run as this user and must reach `directory` through its parents."""
        try:
            owner = pwd.getpwnam("postfix")
        except KeyError:
            raise FileNotFoundError("Postfix is installed but there is no postfix user") from None
        return owner.pw_uid, owner.pw_gid

    def check_reachable(self) -> None:
        """Postfix opens its lock files and Maildirs by absolute path after dropping root, so
        every parent of `directory` must be searchable by the postfix user (pytest's tmp_path is
        not: its root is mode 0700; `tempfile.mkdtemp()` is: /tmp is world-searchable, and `start()`
        makes `directory` itself mode 0755)."""
        uid, _ = self._delivery_owner()
        for parent in self.directory.parents:
            mode = parent.stat().st_mode if parent.exists() else 0o755
            if not mode & 0o001 and parent.stat().st_uid != uid:
                raise PermissionError(
                    f"{parent} (mode {mode & 0o777:o}) is not searchable by the postfix user; "
                    "put the Postfix instance in a directory every user can traverse"
                )

    # Control -----------------------------------------------------------------------------------
    def command(self, name: str, *args: str, check: bool = True) -> str:
        """Run a Postfix command (`postfix`, `postconf`, `postqueue`) with `-c` this instance's
        config directory; its output (stdout and stderr)."""
        path = postfix_command(name)
        if path is None:
            raise FileNotFoundError(f"{name}: {missing_reason()}")
        result = subprocess.run(
            [path, "-c", str(self.config_directory), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = result.stdout + result.stderr
        if check and result.returncode != 0:
            raise AssertionError(f"{name} {' '.join(args)} failed: {output}\n{self.log_text()}")
        return output

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration and start the master; returns once port 25 answers."""
        if os.geteuid() != 0:
            raise PermissionError("a Postfix instance needs root (its master process)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        self.check_reachable()
        self.write_config()
        self.running = True
        self.command("postfix", "start")
        try:
            wait_port(self.address, self.port, timeout)
        except OSError:
            raise AssertionError(
                f"Postfix did not open {self.address}:{self.port}:\n{self.log_text()}"
            ) from None

    def stop(self, timeout: float = 30.0) -> None:
        """`postfix stop` and wait for the master to exit (SIGKILL after `timeout`)."""
        if not self.running:
            return
        pid = self.master_pid()
        self.command("postfix", "stop", check=False)
        deadline = time.monotonic() + timeout
        while pid is not None and _alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)
        self.running = False

    def master_pid(self) -> int | None:
        path = self.queue_directory / "pid" / "master.pid"
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def flush(self) -> None:
        """Attempt delivery of every deferred letter now (`postfix flush`)."""
        self.command("postfix", "flush")

    def queue_text(self) -> str:
        """`postqueue -p`: what waits in the queue (for failure messages)."""
        return self.command("postqueue", "-p", check=False)

    # Results -----------------------------------------------------------------------------------
    def maildir_messages(self, user: str) -> list[bytes]:
        """Every letter in the user's Maildir (new/ and cur/), oldest first."""
        files: list[Path] = []
        for sub in ("new", "cur"):
            folder = self.maildir(user) / sub
            if folder.is_dir():
                files.extend(p for p in folder.iterdir() if p.is_file())
        files.sort(key=lambda p: (p.stat().st_mtime, p.name))
        return [p.read_bytes() for p in files]

    def log_text(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def __enter__(self) -> PostfixInstance:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
