"""TLS for `vf server`: the certificate it serves checked at start, and the name local
instances reach the server by.

uvicorn serves the certificate chain and key (`--ssl-certfile/--ssl-keyfile`); workers then
connect with wss:// and API clients with https://. The instances the local runtime starts are
on this machine, but they verify the certificate like any client: they are given an address the
certificate names (the address the server listens on, its loopback address when it listens on
every interface, else the certificate's first DNS name), and the server's own SSL_CERT_FILE /
SSL_CERT_DIR, so a private CA they are told to trust is theirs too.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

from cryptography import x509

from voicefleet.errors import CannotStart

# Passed on to the instances the server starts: what they trust is what the server was told to.
TRUST_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")


def check_tls(certfile: Path | None, keyfile: Path | None) -> None:
    """Both or neither; readable; a key that matches the certificate: one line if not."""
    if certfile is None and keyfile is None:
        return
    if certfile is None or keyfile is None:
        given, missing = ("--ssl-keyfile", "--ssl-certfile") if certfile is None else (
            "--ssl-certfile", "--ssl-keyfile"
        )  # fmt: skip
        raise CannotStart(f"{given} needs {missing}", given, f"pass {missing} too")
    hint = "pass a PEM certificate chain (--ssl-certfile) and its private key (--ssl-keyfile)"
    for path in (certfile, keyfile):
        if not path.is_file():
            raise CannotStart("the file does not exist", path, hint)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as e:
        raise CannotStart(
            f"the certificate and key cannot be used together ({e.reason or e})", certfile, hint
        ) from None
    except OSError as e:
        raise CannotStart(f"cannot read them ({e.strerror})", certfile, hint) from None


def names(certfile: Path) -> tuple[list[str], list[str]]:
    """The leaf certificate's (IP addresses, DNS names), from its subjectAltName."""
    cert = x509.load_pem_x509_certificate(certfile.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return ips, san.get_values_for_type(x509.DNSName)


def instance_host(bound: str, certfile: Path | None) -> str:
    """The host, as written in a URL, that instances on this machine connect to."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(bound, bound)
    if certfile is not None:
        ips, dns = names(certfile)
        if not _named(host, ips) and host in ("127.0.0.1", "::1") and "localhost" in dns:
            host = "localhost"
        elif not _named(host, ips) and host != "localhost":
            usable = [d for d in dns if not d.startswith("*")]
            if usable:  # the certificate is for a name, which must lead to this machine
                host = usable[0]
    return f"[{host}]" if ":" in host else host


def _named(host: str, ips: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ipaddress.ip_address(ip) == address for ip in ips)
