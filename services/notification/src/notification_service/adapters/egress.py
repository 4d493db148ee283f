"""Outbound connections of the webhook channel, pinned to checked addresses.

Every new connection resolves the URL's host, checks EVERY address it resolves to against the URL policy
(`domain.urls.address_problem`), and connects to a checked address — never to a name resolved a second
time. So a name that resolves to a public address when a subscription is made and to a private one later
(DNS rebinding), or to both at once, reaches no private address: the connection is refused before any
byte is sent (`BlockedAddress`).

The pinning sits in the resolution step of aiohttp's connector (`PinnedConnector`): the URL, the `Host`
header, TLS SNI and certificate verification all keep the name; only the TCP connect goes to the
checked address. Kept-alive connections are reused only for the same scheme, host and port, so they too
go to a checked address.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import typing
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
from aiohttp.abc import ResolveResult

from notification_service.domain.urls import UrlPolicy, address_problem, host_problem, parse_address

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class BlockedAddress(Exception):
    """The host, or an address it resolves to, is not allowed by the URL policy: nothing was sent."""


class ResolutionFailed(Exception):
    """The host name did not resolve."""


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for a TCP connection (the system resolver), in its order."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolutionFailed("the host did not resolve") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class AddressGuard:
    """Resolves a host and checks every address it resolves to."""

    def __init__(self, policy: UrlPolicy, resolver: Resolver = system_resolver) -> None:
        self.policy = policy
        self.resolver = resolver

    async def addresses(self, host: str, port: int) -> list[str]:
        """The checked addresses to connect to, in the resolver's order. Raises BlockedAddress when the
        host or any of its addresses is not allowed, ResolutionFailed when it resolves to nothing."""
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            literal = parse_address(bare)
        except ValueError:
            literal = None
        if literal is None:
            if host_problem(bare.lower(), self.policy):
                raise BlockedAddress("host")
            found = list(await self.resolver(bare, port))
        else:
            found = [bare]
        if not found:
            raise ResolutionFailed("the host resolved to no address")
        for text in found:
            try:
                address = parse_address(text)
            except ValueError:
                raise BlockedAddress("not an IP address") from None
            if address_problem(address, self.policy) is not None:
                raise BlockedAddress("address")
        return found


class PinnedConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector (its keep-alive pool), connecting only to addresses the guard checked.

    Every host a new connection is made for, an IP literal too, goes through the guard (no DNS cache:
    each new connection resolves again); the checked addresses are tried one after another in the
    resolver's order (no happy eyeballs racing). No proxies (the session does not trust the
    environment), no unix sockets (a TCP connector only).

    The hook is `_resolve_host`, the one method aiohttp asks for the addresses of every host, literal
    or not (aiohttp is pinned in uv.lock; the tests of `test_notification_url_policy` cover it)."""

    def __init__(
        self,
        guard: AddressGuard,
        *,
        limit: int,
        keepalive_timeout: float,
        ssl_context: ssl.SSLContext,
        socket_factory: Callable[[typing.Any], socket.socket] | None = None,
    ) -> None:
        super().__init__(
            limit=limit,
            limit_per_host=0,
            keepalive_timeout=keepalive_timeout,
            use_dns_cache=False,
            ssl=ssl_context,
            happy_eyeballs_delay=None,
            socket_factory=socket_factory,
        )
        self.guard = guard

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[typing.Any] | None = None
    ) -> list[ResolveResult]:
        addresses = await self.guard.addresses(host, port)
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]
