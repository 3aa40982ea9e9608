"""The webhook URL policy, one for the API (at registration) and the worker (at every connect).

A webhook target must be http(s) and every address its host resolves to must be public: loopback, unspecified,
private (RFC 1918, unique-local), link-local (cloud metadata), shared (CGNAT 100.64/10), IETF protocol (192.0.0/24),
benchmarking, reserved and multicast addresses are refused, and so are IPv6 transition addresses that reach an
embedded IPv4 one (compatible ::/96, 6to4, Teredo, NAT64) and IPv4-mapped ones whose IPv4 address is refused. An
operator admits internal targets by network in ``IVON_DIAG_WEBHOOK_ALLOW`` (comma-separated addresses or CIDRs).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlsplit

ALLOW_ENV = "IVON_DIAG_WEBHOOK_ALLOW"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "metadata.azure.internal"}
_V4_REFUSED = [(ipaddress.ip_network(n), why) for n, why in (
    ("0.0.0.0/8", "unspecified"), ("100.64.0.0/10", "shared (CGNAT)"), ("192.0.0.0/24", "IETF protocol"),
    ("198.18.0.0/15", "benchmarking"), ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"))]
_NAT64 = [ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48")]
_COMPATIBLE = ipaddress.ip_network("::/96")


def allowed_networks(value: str | None = None) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The operator's allow-list (``IVON_DIAG_WEBHOOK_ALLOW`` unless ``value`` is given)."""
    value = os.environ.get(ALLOW_ENV, "") if value is None else value
    nets = []
    for item in value.split(","):
        if item.strip():
            try:
                nets.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{ALLOW_ENV}: {item.strip()!r} is not an address or a network") from None
    return nets


def refusal(ip: IPAddress) -> str | None:
    """Why a webhook may not connect to ``ip`` (None: it may)."""
    if ip.version == 6:
        if ip.ipv4_mapped:  # ::ffff:a.b.c.d is the IPv4 address itself
            why = refusal(ip.ipv4_mapped)
            return f"IPv4-mapped {ip.ipv4_mapped}, {why}" if why else None
        if ip.sixtofour or ip.teredo or ip in _COMPATIBLE or any(ip in n for n in _NAT64):
            return "IPv4 transition (6to4, Teredo, NAT64 or IPv4-compatible: it reaches an embedded IPv4 address)"
    for attr, why in (("is_loopback", "loopback"), ("is_unspecified", "unspecified"),
                      ("is_link_local", "link-local (cloud metadata)"), ("is_multicast", "multicast"),
                      ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(ip, attr):
            return why
    if ip.version == 4:
        for net, why in _V4_REFUSED:
            if ip in net:
                return why
    return None if ip.is_global else "not public"


def check_address(ip: IPAddress, host: str, allow=None) -> None:
    allow = allowed_networks() if allow is None else allow
    why = refusal(ip)
    if why and not any(ip.version == n.version and ip in n for n in allow):
        raise ValueError(f"webhook target {host!r} resolves to {ip}, a {why} address (refused; an operator "
                         f"admits internal networks in {ALLOW_ENV})")


def resolve(host: str, port: int | None = None) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal: itself); [] when it does not resolve now."""
    try:
        return [ipaddress.ip_address(host.strip("[]").split("%")[0])]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos))


def check_webhook_url(url: str, allow=None) -> list[IPAddress]:
    """Raise ValueError for a URL that is not http(s) or whose host resolves to any refused address; returns the
    checked addresses ([] when the host does not resolve now: delivery checks again at every connect)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"webhook URL is not a valid URL: {url[:200]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL must be http(s)://host/…, got {url[:200]!r}")
    if parts.username or parts.password:
        raise ValueError("webhook URL must not carry credentials (user:password@); sign with the hook's secret")
    host = parts.hostname.lower().rstrip(".")
    if host in _METADATA_HOSTS:
        raise ValueError(f"webhook target {host!r} is a cloud metadata service (refused)")
    addrs = resolve(host, port)
    for ip in addrs:
        check_address(ip, host, allow)
    return addrs
