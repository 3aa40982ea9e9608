"""Webhook target checks, shared by the API (at registration) and the worker (at delivery)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

_METADATA_HOSTS = {"metadata.google.internal", "metadata", "169.254.169.254", "fd00:ec2::254"}


def check_webhook_url(url: str, allow_link_local: bool = False) -> None:
    """Raise ValueError for non-HTTP URLs and, unless allowed, link-local or cloud-metadata targets."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL must be http(s)://host/…, got {url!r}")
    if allow_link_local:
        return
    host = parts.hostname.lower()
    if host in _METADATA_HOSTS:
        raise ValueError(f"webhook target {host!r} is a cloud metadata service (refused)")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return  # unresolvable now: delivery will fail and be retried, nothing to leak
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%")[0])
        if ip.is_link_local or str(ip) in _METADATA_HOSTS:
            raise ValueError(f"webhook target {host!r} resolves to link-local address {ip} (refused)")


