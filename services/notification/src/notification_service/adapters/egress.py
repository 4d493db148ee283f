"""Outbound connections of the webhook channel, pinned to checked addresses.

Every new connection resolves the URL's host, checks EVERY address it resolves to against the URL policy
(`domain.urls.address_problem`), and connects to a checked address — never to a name resolved a second
time. So a name that resolves to a public address when a subscription is made and to a private one later
(DNS rebinding), or to both at once, reaches no private address: the connection is refused before any
byte is sent (`BlockedAddress`).

The pinning sits in the network backend of httpx's connection pool (`PinnedBackend`): the URL, the `Host`
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

import httpcore
import httpx

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


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses the guard checked."""

    def __init__(self, guard: AddressGuard, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.guard = guard
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.guard.addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout("resolving the host timed out") from None
        options = list(socket_options or ())
        last: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("unix socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport whose connection pool connects through a `PinnedBackend` (no proxies: a proxy
    would resolve the name itself)."""

    def __init__(
        self,
        guard: AddressGuard,
        *,
        limits: httpx.Limits,
        verify: ssl.SSLContext | bool = True,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=PinnedBackend(guard, inner),
        )
