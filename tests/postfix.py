"""Debian's Postfix as an organisation's relay, for the end-to-end mail suite and its benchmark.

A private instance (its own configuration, queue and log in a temporary folder, its own loopback
port) with STARTTLS, SMTP AUTH through Cyrus SASL's sasldb, and Postfix's strict RFC checks, that
relays everything to Postfix's ``smtp-sink``, which writes each message it accepts to a file.
Rules for recipients and senders are ``texthash`` tables a test rewrites, then ``reload``\\ s.

Postfix runs its daemons as the ``postfix`` user, so this needs root and Debian's ``postfix`` and
``sasl2-bin`` packages (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from email import message_from_bytes
from pathlib import Path

import trustme

from tests.services import free_port, unavailable, wait_for

DOMAIN = "relay.test"
USER = f"dearmp@{DOMAIN}"
PASSWORD = "relay-password"

# The services of Debian's master.cf that relaying needs, none chrooted (the queue is ours).
MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """One private Postfix relay on loopback; ``start()`` it, ``stop()`` it when done."""

    def __init__(self, senders: tuple[str, ...] = ("letters@campaign.example.org",)) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dearmp-postfix-"))
        self.base.chmod(0o755)  # Postfix's daemons, as the postfix user, read below it
        self.etc = self.base / "etc"
        self.port, self.sink_port = free_port(), free_port()
        self.sink_dir = self.base / "sink"
        self.maillog = self.base / "maillog"
        self.senders = senders
        self.sink: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> Path:
        return self.etc / "ca.pem"

    def environment(self, **extra: str) -> dict[str, str]:
        """The worker settings for this relay: STARTTLS checked against its certificate, AUTH."""
        return {
            "DEARMP_MAIL_BACKEND": "smtp",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.port),
            "SMTP_SECURITY": "starttls",
            "SMTP_CA_FILE": str(self.ca_file),
            "SMTP_USERNAME": USER,
            "SMTP_PASSWORD": PASSWORD,
            "SMTP_HELO_NAME": "worker.campaign.example.org",
            **extra,
        }

    def start(self, **main_cf: str) -> Postfix:
        if os.geteuid() != 0:
            unavailable("Postfix runs its daemons as the postfix user: the suite needs root")
        if not (shutil.which("postfix") and shutil.which("smtp-sink")):
            unavailable("Debian's postfix package is not installed")
        if not shutil.which("saslpasswd2"):
            unavailable("Debian's sasl2-bin package is not installed")
        for folder in ("etc", "etc/sasl", "spool", "data", "sink"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.base / "data", "postfix")
        shutil.chown(self.sink_dir, "postfix")
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        (self.etc / "main.cf").write_text(self._main_cf(main_cf))
        authority = trustme.CA()  # the relay's certificate, from a CA the workers trust
        authority.cert_pem.write_to_path(str(self.ca_file))
        server = authority.issue_cert(DOMAIN, "127.0.0.1")
        server.private_key_and_cert_chain_pem.write_to_path(str(self.etc / "relay.pem"))
        (self.etc / "sasl" / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
            f"sasldb_path: {self.etc / 'sasl' / 'sasldb2'}\n"
        )
        self.password(PASSWORD)
        self.rules(recipients={})
        self.sink = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-d", f"{self.sink_dir}/%H%M%S.",
             f"127.0.0.1:{self.sink_port}", "256"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._postfix("start")
        if not wait_for(self._listening, 20):
            raise RuntimeError(f"Postfix did not start:\n{self.log()[-2000:]}")
        return self

    def _main_cf(self, extra: dict[str, str]) -> str:
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.base / "spool"),
            "data_directory": str(self.base / "data"),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.base),
            "myhostname": DOMAIN,
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "smtp_tls_security_level": "none",
            "smtpd_tls_chain_files": str(self.etc / "relay.pem"),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_auth_only": "yes",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "smtpd_sasl_local_domain": DOMAIN,
            # Only an authenticated client relays, and only from the senders its login owns.
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_sender_login_maps": f"texthash:{self.etc / 'senders'}",
            "smtpd_sender_restrictions": "reject_sender_login_mismatch",
            "smtpd_recipient_restrictions": f"check_recipient_access texthash:{self.etc / 'rcpt'}",
            # The strict checks an organisation's relay may have on.
            "strict_rfc821_envelopes": "yes",
            "strict_7bit_headers": "yes",
            "smtpd_forbid_bare_newline": "yes",
            "smtpd_forbid_unauth_pipelining": "yes",
            # Loopback clients are exempt from connection limits unless this is emptied.
            "smtpd_client_event_limit_exceptions": "",
            **extra,
        }
        return "".join(f"{name} = {value}\n" for name, value in params.items())

    def _postfix(self, command: str) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), command], check=True, capture_output=True)

    def _running(self) -> bool:
        status = ["postfix", "-c", str(self.etc), "status"]
        return subprocess.run(status, capture_output=True).returncode == 0

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def configure(self, **main_cf: str) -> None:
        """Change main.cf settings, then reload (as an operator would)."""
        subprocess.run(
            ["postconf", "-c", str(self.etc), "-e", *(f"{k}={v}" for k, v in main_cf.items())],
            check=True,
            capture_output=True,
        )
        self.reload()

    def rules(self, recipients: dict[str, str], senders: tuple[str, ...] | None = None) -> None:
        """Write the recipient rules (address or domain -> an answer such as ``451 4.3.0 ...``)
        and the senders the login owns. Running sessions keep the old rules until ``reload``."""
        if senders is not None:
            self.senders = senders
        (self.etc / "rcpt").write_text("".join(f"{k} {v}\n" for k, v in recipients.items()))
        (self.etc / "senders").write_text("".join(f"{s} {USER}\n" for s in self.senders))

    def reload(self) -> None:
        self._postfix("reload")

    def password(self, password: str) -> None:
        """Set the relay account's password (read by each new authentication)."""
        sasldb = self.etc / "sasl" / "sasldb2"
        subprocess.run(
            ["saslpasswd2", "-p", "-c", "-f", str(sasldb), "-u", DOMAIN, USER.split("@")[0]],
            input=password.encode(),
            check=True,
            capture_output=True,
        )
        shutil.chown(sasldb, "postfix")

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def count(self, text: str) -> int:
        """Lines of the relay's log that contain ``text``."""
        return sum(1 for line in self.log().splitlines() if text in line)

    def message_ids(self) -> list[str]:
        """The Message-ID of every message the relay handed on to smtp-sink (one per copy)."""
        ids = []
        for dump in self.sink_dir.iterdir():
            ids.append(str(message_from_bytes(dump.read_bytes())["Message-ID"]))
        return ids

    def stop(self) -> None:
        try:
            self._postfix("stop")
        except subprocess.CalledProcessError:
            pass
        if self.sink is not None:
            self.sink.terminate()
            self.sink.wait(timeout=10)
        wait_for(lambda: not self._running(), 20)
        shutil.rmtree(self.base, ignore_errors=True)
