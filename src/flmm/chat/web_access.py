"""Who may reach `flmm web`: the address it binds, the login it asks, and HTTPS for both.

The page binds to a loopback address unless told otherwise. Serving beyond this machine (a
``--host`` other than a loopback address) needs ``--allow-remote`` and a login, read from
``$FLMM_WEB_AUTH`` (``user:password``) or ``--auth-file`` (one ``user:password`` a line), never
from the command line. Anyone on the network path can read a login sent over plain HTTP: with
``--ssl-certfile`` and ``--ssl-keyfile`` (PEM) the page is served over HTTPS; without them, such a
page prints a ``WARNING`` line to stderr.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from flmm.errors import FlmmUserError

AUTH_ENV = "FLMM_WEB_AUTH"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_credentials(auth_file: str | None) -> list[tuple[str, str]]:
    """``(user, password)`` pairs from ``auth_file`` (one ``user:password`` a line) or else from
    ``$FLMM_WEB_AUTH``; empty if neither is given."""
    if auth_file:
        if not Path(auth_file).is_file():
            raise FileNotFoundError(f"--auth-file {auth_file} does not exist")
        lines = Path(auth_file).read_text().splitlines()
    else:
        lines = [os.environ.get(AUTH_ENV, "")]
    pairs = [tuple(line.strip().split(":", 1)) for line in lines if line.strip()]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise FlmmUserError(f"credentials must be user:password (from --auth-file or ${AUTH_ENV})")
    return pairs


def serving_auth(host: str, allow_remote: bool, auth_file: str | None) -> list | None:
    """The login to require; a :class:`FlmmUserError` for a non-loopback ``host`` without
    ``allow_remote`` or without credentials."""
    pairs = read_credentials(auth_file)
    if is_loopback(host):
        return pairs or None
    if not allow_remote:
        raise FlmmUserError(
            f"--host {host} makes the page reachable from other machines; bind to 127.0.0.1, or "
            f"pass --allow-remote with a login in ${AUTH_ENV} (user:password) or --auth-file"
        )
    if not pairs:
        raise FlmmUserError(
            f"--allow-remote needs a login: set ${AUTH_ENV}=user:password or pass --auth-file "
            "FILE (one user:password a line); never put passwords on the command line"
        )
    return pairs


def serving_tls(certfile: str | None, keyfile: str | None) -> dict:
    """Gradio ``launch`` arguments serving HTTPS with ``certfile`` and ``keyfile`` (PEM), each
    checked to be readable; empty for plain HTTP (neither given)."""
    if not certfile and not keyfile:
        return {}
    if not (certfile and keyfile):
        raise FlmmUserError(
            "--ssl-certfile and --ssl-keyfile go together: pass the certificate and its private "
            "key (PEM files)"
        )
    for option, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        check_readable(option, Path(path))
    # ssl_verify is Gradio's start-up request to its own local address, which a certificate
    # for the server's public name does not cover; clients verify the certificate as usual
    return {"ssl_certfile": certfile, "ssl_keyfile": keyfile, "ssl_verify": False}


def check_readable(option: str, path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{option} {path} does not exist")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as err:
        raise FlmmUserError(f"{option} {path} cannot be read ({err.strerror})") from None


def warn_plain_http(host: str, auth: list | None, tls: dict) -> None:
    """A ``WARNING`` line on stderr when a login would cross the network unencrypted."""
    if auth and not tls and not is_loopback(host):
        print(
            f"WARNING: the login travels unencrypted: the page on {host} is plain HTTP, so "
            "anyone on the network path can read the passwords; pass --ssl-certfile and "
            "--ssl-keyfile, or serve it behind an HTTPS proxy",
            file=sys.stderr,
        )
