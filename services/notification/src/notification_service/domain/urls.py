"""Where a webhook may go: the URL policy, checked when a subscription is made and again when a delivery
connects (then against every address the name resolves to; see `adapters.egress`).

A webhook URL is `https`, names a public host by a fully qualified domain name or a canonical IP literal,
and carries no user information and no fragment. Refused as hosts: `localhost` and `*.localhost` (also
with a trailing dot), integer, octal, hex or shortened IPv4 forms (`2852039166`, `0xA9FEA9FE`, `0251.0376.
0251.0376`, `127.1`), and any address that is not public: loopback, private (RFC 1918, ULA), link-local
(169.254.0.0/16, the cloud metadata address 169.254.169.254, fe80::/10), shared/CGNAT (100.64.0.0/10),
multicast, reserved, unspecified, site-local, and the IPv6 forms that embed an IPv4 address
(IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, 6to4, Teredo, NAT64) whose IPv4 address is
any of those.

`UrlPolicy(allow_loopback=True)` (the deployment flag `V2V_WEBHOOK_ALLOW_LOOPBACK`, development only)
also allows `http` and loopback addresses (`localhost`, 127.0.0.0/8, ::1); private and link-local
addresses stay refused.

Pure: no resolution here (the caller resolves and hands the addresses to `address_problem`). Reasons
never echo the URL.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from v2v_contracts.errors import Invalid

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_CHARS = 2000
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DECIMAL_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_DECIMAL_OCTET}(?:\.{_DECIMAL_OCTET}){{3}}")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")  # a last label like this makes a host an IPv4 form

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


@dataclass(frozen=True)
class UrlPolicy:
    allow_loopback: bool = False  # development only: http and loopback addresses too

    @property
    def schemes(self) -> frozenset[str]:
        return frozenset({"https", "http"}) if self.allow_loopback else frozenset({"https"})


@dataclass(frozen=True)
class Target:
    """A URL that passed the policy: where to connect. `address` is set when the host is an IP literal."""

    scheme: str
    host: str  # lower case; an IPv6 literal without its brackets
    port: int
    address: IPAddress | None


def _refuse(reason: str) -> Invalid:
    return Invalid("url", reason)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, 6to4, Teredo, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    value = int(ip)
    if value >> 32 == 0 and value > 1:  # IPv4-compatible ::a.b.c.d (deprecated); :: and ::1 are not
        return ipaddress.IPv4Address(value)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def address_problem(ip: IPAddress, policy: UrlPolicy) -> str | None:
    """Why a webhook must not connect to `ip` (the kind of address it is), or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "an address with a zone id"
        inner = _embedded_ipv4(ip)
        if inner is not None:
            problem = address_problem(inner, policy)
            return None if problem is None else f"{problem} (embedded in an IPv6 address)"
        if ip.is_site_local:
            return "site-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return None if policy.allow_loopback else "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "shared address space (CGNAT)"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    return None


def host_problem(host: str, policy: UrlPolicy) -> str | None:
    """Why a host name (not an IP literal) is refused, or None. `host` is lower case."""
    bare = host[:-1] if host.endswith(".") else host
    if bare == "localhost" or bare.endswith(".localhost"):
        if policy.allow_loopback and bare == "localhost" and not host.endswith("."):
            return None
        return "must not name localhost"
    if host.endswith("."):
        return "the host must not end with a dot"
    labels = bare.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return "an IPv4 address must be written as four decimal numbers a.b.c.d"
    if len(bare) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return "the host must be a domain name of letters, digits and hyphens (punycode for others)"
    if len(labels) < 2:
        return "the host must be a fully qualified domain name"
    return None


def parse_address(text: str) -> IPAddress:
    """An address as a resolver returns it (an IPv6 one may carry a `%zone`). ValueError if not one."""
    return ipaddress.ip_address(text)


def _split(url: str) -> SplitResult:
    if not url or len(url) > MAX_URL_CHARS:
        raise _refuse(f"must be 1..{MAX_URL_CHARS} characters")
    if not _PRINTABLE_ASCII.fullmatch(url):
        raise _refuse("must be ASCII without spaces or control characters (punycode for other names)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise _refuse("is not a valid absolute URL") from None
    return parts


def check_url(url: str, policy: UrlPolicy) -> Target:
    """The target of a webhook URL that follows the policy; else Invalid naming `url` and the rule."""
    parts = _split(url)
    scheme = parts.scheme.lower()
    if scheme not in policy.schemes:
        raise _refuse("must be an https URL")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise _refuse("must not contain user information")
    if "#" in url:
        raise _refuse("must not contain a fragment")
    host = parts.hostname or ""
    if not host:
        raise _refuse("must name a host")
    port = parts.port if parts.port is not None else (443 if scheme == "https" else 80)
    if port == 0:
        raise _refuse("must not use port 0")
    if "%" in host:
        raise _refuse("must not carry an IPv6 zone id")
    address: IPAddress | None = None
    if parts.netloc.rpartition("@")[2].startswith("["):
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise _refuse("is not a valid IPv6 address") from None
    elif _CANONICAL_IPV4.fullmatch(host):
        address = ipaddress.IPv4Address(host)
    if address is None:
        problem = host_problem(host, policy)
        if problem:
            raise _refuse(problem)
    else:
        problem = address_problem(address, policy)
        if problem:
            raise _refuse(f"must be a public address, not {problem}")
    return Target(scheme, host, port, address)
