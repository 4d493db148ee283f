"""Where a webhook may go: the URL policy at subscription time (every refused form), and at connect time
the check of every resolved address with the connection pinned to a checked one, so that DNS rebinding
reaches no private address (no socket is opened here: the socket factory under the pin records what
it is asked to connect to)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from notification_service.adapters.egress import (
    AddressGuard,
    BlockedAddress,
    PinnedConnector,
    ResolutionFailed,
)
from notification_service.adapters.secret_box import DEV_KEY, SecretBox, new_signing_secret
from notification_service.adapters.webhooks import WebhookSender
from notification_service.domain.delivery import WebhookDelivery
from notification_service.domain.urls import UrlPolicy, address_problem, check_url
from v2v_contracts.errors import Invalid

STRICT = UrlPolicy()
DEV = UrlPolicy(allow_loopback=True)
BOX = SecretBox(DEV_KEY)

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"


def refusal(url: str, policy: UrlPolicy = STRICT) -> str:
    with pytest.raises(Invalid) as info:
        check_url(url, policy)
    assert [e.field for e in info.value.errors] == ["url"]
    return info.value.errors[0].reason


# ---- at subscription: the URL --------------------------------------------------------------------------

REFUSED_EVERYWHERE = {
    # link-local and the cloud metadata address, in every spelling
    "https://169.254.169.254/latest/meta-data/": "link-local",
    "https://169.254.0.1/": "link-local",
    "https://[::ffff:169.254.169.254]/": "link-local",  # IPv4-mapped IPv6
    "https://[::ffff:a9fe:a9fe]/": "link-local",  # ... in hex
    "https://[0:0:0:0:0:ffff:169.254.169.254]/": "link-local",
    "https://[::169.254.169.254]/": "link-local",  # IPv4-compatible IPv6
    "https://[2002:a9fe:a9fe::1]/": "link-local",  # 6to4
    "https://[64:ff9b::a9fe:a9fe]/": "link-local",  # NAT64
    "https://[fe80::1]/": "link-local",
    "https://2852039166/": "four decimal numbers",  # 169.254.169.254 as one decimal integer
    "http://2852039166/": "",  # (and plain http)
    "https://0xA9FEA9FE/": "four decimal numbers",  # ... in hex
    "https://0xa9.0xfe.0xa9.0xfe/": "four decimal numbers",
    "https://0251.0376.0251.0376/": "four decimal numbers",  # ... in octal
    "https://169.254.43518/": "four decimal numbers",  # ... shortened
    "https://017700000001/": "four decimal numbers",  # 127.0.0.1 in octal
    "https://127.1/": "four decimal numbers",
    "https://0/": "four decimal numbers",
    # private ranges (RFC 1918, ULA), CGNAT, multicast, reserved, unspecified
    "https://10.0.0.1/": "private",
    "https://172.16.5.4/": "private",
    "https://172.31.255.255/": "private",
    "https://192.168.0.10/": "private",
    "https://[::ffff:10.0.0.1]/": "private",
    "https://[::ffff:192.168.1.1]/": "private",
    "https://[fd12:3456:789a::1]/": "private",
    "https://[fc00::1]/": "private",
    "https://100.64.0.1/": "CGNAT",
    "https://100.127.255.254/": "CGNAT",
    "https://[::ffff:100.64.0.1]/": "CGNAT",
    "https://224.0.0.251/": "multicast",
    "https://239.255.255.250/": "multicast",
    "https://[ff02::1]/": "multicast",
    "https://[::ffff:224.0.0.1]/": "multicast",
    "https://240.0.0.1/": "",
    "https://255.255.255.255/": "",
    "https://0.0.0.0/": "unspecified",
    "https://[::]/": "unspecified",
    "https://[::ffff:0.0.0.0]/": "unspecified",
    "https://[fec0::1]/": "site-local",
    "https://192.0.2.10/": "",  # documentation
    # names that are not public
    "https://localhost./": "localhost",
    "https://LOCALHOST./": "localhost",
    "https://api.localhost/": "localhost",
    "https://api.localhost./": "localhost",
    "https://intranet/": "fully qualified",
    "https://hooks.example.com./": "dot",
    "https://hooks_internal.example.com/": "domain name",
    "https://-hooks.example.com/": "domain name",
    # user information, fragments, zone ids, other schemes, malformed
    "https://user:password@hooks.example.com/": "user information",
    "https://user@hooks.example.com/": "user information",
    "https://hooks.example.com@169.254.169.254/": "user information",
    "https://hooks.example.com/hook#fragment": "fragment",
    "https://hooks.example.com/hook#": "fragment",
    "https://[fe80::1%25eth0]/": "zone id",
    "ftp://hooks.example.com/": "https",
    "file:///etc/passwd": "https",
    "gopher://hooks.example.com/": "https",
    "/relative/hook": "https",
    "//hooks.example.com/hook": "https",
    "https:///hook": "host",
    "https://hooks.example.com:0/": "port 0",
    "https://hooks.example.com:65536/": "valid",
    "https://[::1/": "valid",
    "https://[not-an-ip]/": "valid",
    "https://hooks.example.com/\u00e4": "ASCII",
    "https://h\u00f6oks.example.com/": "ASCII",
    "https://hooks.example.com/a b": "ASCII",
    "https://hooks.example.com/\r\nX-Injected: 1": "ASCII",
    "": "1..2000",
    "https://hooks.example.com/" + "a" * 2000: "1..2000",
}

REFUSED_UNLESS_DEVELOPMENT = {
    "https://127.0.0.1/": "loopback",
    "https://127.1.2.3/": "loopback",
    "https://[::1]/": "loopback",
    "https://[::ffff:127.0.0.1]/": "loopback",
    "https://localhost/": "localhost",
    "http://hooks.example.com/hook": "https",
    "http://127.0.0.1:8080/hook": "https",
}

ACCEPTED = [
    "https://hooks.example.com/v2v",
    "https://hooks.example.com:8443/v2v?centre=TC-DE-BE-001",
    "HTTPS://Hooks.Example.COM/v2v",
    f"https://{PUBLIC_V4}/hook",
    f"https://[{PUBLIC_V6}]/hook",
    "https://[64:ff9b::808:808]/",  # NAT64 of a public address
    "https://xn--rzte-loa.example/",  # punycode
    "https://8.8.8.8/",
]


@pytest.mark.parametrize(("url", "why"), REFUSED_EVERYWHERE.items())
def test_refused_whatever_the_deployment(url: str, why: str) -> None:
    for policy in (STRICT, DEV):
        reason = refusal(url, policy)
        assert why in reason, (url, reason)


@pytest.mark.parametrize(("url", "why"), REFUSED_UNLESS_DEVELOPMENT.items())
def test_loopback_and_http_are_allowed_only_in_development(url: str, why: str) -> None:
    assert why in refusal(url, STRICT)
    check_url(url, DEV)


@pytest.mark.parametrize("url", ACCEPTED)
def test_public_https_urls_are_accepted(url: str) -> None:
    target = check_url(url, STRICT)
    assert target.scheme == "https" and target.host == target.host.lower()


def test_the_target_names_host_port_and_a_literal_address() -> None:
    target = check_url("https://Hooks.Example.com:8443/x", STRICT)
    assert (target.host, target.port, target.address) == ("hooks.example.com", 8443, None)
    target = check_url(f"https://[{PUBLIC_V6}]/x", STRICT)
    assert (target.port, target.address) == (443, ipaddress.IPv6Address(PUBLIC_V6))
    assert check_url("http://127.0.0.1/x", DEV).port == 80


def test_a_refusal_never_echoes_the_url() -> None:
    for url in (
        "https://10.0.0.1/PATIENT-MARKER",
        "https://PATIENT-MARKER:x@hooks.example.com/",
        "https://patient-marker/",
        "https://hooks.example.com/#PATIENT-MARKER",
    ):
        with pytest.raises(Invalid) as info:
            check_url(url, STRICT)
        assert "marker" not in str(info.value).lower() and "marker" not in info.value.errors[0].reason.lower()


ipv4 = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)


@given(ipv4)
def test_an_ipv4_address_in_any_ipv6_spelling_gets_the_same_verdict(ip: ipaddress.IPv4Address) -> None:
    plain = address_problem(ip, STRICT)
    for v6 in (f"::ffff:{ip}", f"::ffff:{int(ip) >> 16:x}:{int(ip) & 0xFFFF:x}", f"64:ff9b::{ip}"):
        embedded = address_problem(ipaddress.IPv6Address(v6), STRICT)
        assert (embedded is None) == (plain is None), (v6, plain, embedded)


@given(ipv4)
def test_integer_and_hex_spellings_of_an_address_are_always_refused(ip: ipaddress.IPv4Address) -> None:
    for host in (str(int(ip)), f"0x{int(ip):x}", f"0x{int(ip):X}"):
        assert "four decimal numbers" in refusal(f"https://{host}/hook")


@given(ipv4)
def test_a_dotted_quad_is_accepted_exactly_when_the_address_is_public(ip: ipaddress.IPv4Address) -> None:
    public = ip.is_global and not ip.is_multicast and ip not in ipaddress.IPv4Network("100.64.0.0/10")
    try:
        check_url(f"https://{ip}/hook", STRICT)
        accepted = True
    except Invalid:
        accepted = False
    assert accepted == public, ip


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.20.0.1", "private"),
        ("192.168.100.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::abcd", "link-local"),
        ("100.64.12.34", "shared address space (CGNAT)"),
        ("224.0.0.1", "multicast"),
        ("ff05::2", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback (embedded in an IPv6 address)"),
        ("::ffff:169.254.169.254", "link-local (embedded in an IPv6 address)"),
        ("::10.0.0.1", "private (embedded in an IPv6 address)"),
        (PUBLIC_V4, None),
        (PUBLIC_V6, None),
    ],
)
def test_address_categories(address: str, category: str | None) -> None:
    assert address_problem(ipaddress.ip_address(address), STRICT) == category


def test_development_allows_loopback_only() -> None:
    for allowed in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert address_problem(ipaddress.ip_address(allowed), DEV) is None
    for refused in ("10.0.0.1", "169.254.169.254", "fd00::1", "100.64.0.1", "0.0.0.0"):
        assert address_problem(ipaddress.ip_address(refused), DEV) is not None


# ---- at connect time: every resolved address, pinned --------------------------------------------------


class FakeDns:
    """A resolver whose answers the test sets (and changes: DNS rebinding)."""

    def __init__(self, *answers: Sequence[str] | Exception) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append((host, port))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class RecordingBackend:
    """The connector's socket factory: records every TCP connect it is asked for and refuses it (no
    socket is opened)."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    def __call__(self, addr_info: Any) -> socket.socket:
        host, port = addr_info[4][:2]
        self.connects.append((host, port))
        raise OSError(errno.EHOSTUNREACH, "refused by the test backend")


def delivery(url: str) -> WebhookDelivery:
    sid = uuid.uuid4()
    return WebhookDelivery(
        event_id=uuid.uuid4(),
        event_type="order.submitted.v1",
        order_id=uuid.uuid4(),
        coi="V2V00-26-000042-K",
        treatment_center_id="TC-DE-BE-001",
        delivery_id=uuid.uuid4(),
        attempts=0,
        subscription_id=sid,
        url=url,
        sealed_secrets=(BOX.seal(new_signing_secret(), sid),),
        payload=b"{}",
    )


def sender(dns: FakeDns, backend: RecordingBackend, policy: UrlPolicy = STRICT) -> WebhookSender:
    guard = AddressGuard(policy, dns)
    return WebhookSender(2.0, BOX, policy, guard=guard, socket_factory=backend)


async def test_the_connection_goes_to_the_checked_address_not_to_the_name() -> None:
    dns, backend = FakeDns([PUBLIC_V4, PUBLIC_V6]), RecordingBackend()
    hooks = sender(dns, backend)
    outcome = await hooks.send(delivery("https://hooks.example.com/v2v"))
    await hooks.aclose()
    assert dns.asked == [("hooks.example.com", 443)]
    # each checked address tried in the resolver's order: never the name, never a second resolution
    assert backend.connects == [(PUBLIC_V4, 443), (PUBLIC_V6, 443)]
    assert (outcome.status_code, outcome.error) == (None, "connection_error")


@pytest.mark.parametrize(
    "answer",
    [
        ["10.0.0.5"],
        ["169.254.169.254"],
        ["::ffff:169.254.169.254"],
        ["127.0.0.1"],
        ["::1"],
        ["fd00::5"],
        ["100.64.1.1"],
        [PUBLIC_V4, "192.168.1.20"],  # one public, one private: blocked
        ["192.168.1.20", PUBLIC_V4],
        [PUBLIC_V6, "fe80::1%2"],
        ["not-an-address"],
    ],
)
async def test_a_name_that_resolves_to_a_private_address_is_blocked_and_nothing_is_sent(
    answer: list[str],
) -> None:
    dns, backend = FakeDns(answer), RecordingBackend()
    hooks = sender(dns, backend)
    outcome = await hooks.send(delivery("https://hooks.example.com/v2v"))
    await hooks.aclose()
    assert (outcome.status_code, outcome.error, outcome.permanent) == (None, "blocked_address", True)
    assert backend.connects == []  # not one connection attempted


async def test_dns_rebinding_between_two_deliveries_reaches_no_private_address() -> None:
    # public when first asked (as when the subscription was made), the metadata address afterwards
    dns, backend = FakeDns([PUBLIC_V4], ["169.254.169.254"]), RecordingBackend()
    hooks = sender(dns, backend)
    first = await hooks.send(delivery("https://rebind.example.com/hook"))
    second = await hooks.send(delivery("https://rebind.example.com/hook"))
    await hooks.aclose()
    assert first.error == "connection_error"  # (the test backend refuses every connection)
    assert second.error == "blocked_address"
    assert backend.connects == [(PUBLIC_V4, 443)]  # the rebound answer was never connected to
    assert len(dns.asked) == 2


async def test_loopback_is_reachable_only_with_the_development_flag() -> None:
    dns, backend = FakeDns(["127.0.0.1"]), RecordingBackend()
    strict = sender(dns, backend, STRICT)
    assert (await strict.send(delivery("https://hooks.example.com/"))).error == "blocked_address"
    await strict.aclose()
    assert backend.connects == []
    dev = sender(dns, backend, DEV)
    await dev.send(delivery("http://hooks.example.com:8080/"))
    await dev.aclose()
    assert backend.connects == [("127.0.0.1", 8080)]


@pytest.mark.parametrize(
    "url",
    ["http://hooks.example.com/", "https://10.0.0.1/", "https://localhost/", "https://169.254.169.254/"],
)
async def test_a_stored_url_that_breaks_the_policy_now_is_blocked_without_resolving(url: str) -> None:
    # e.g. subscribed in a development deployment, delivered by one without the flag
    dns, backend = FakeDns([PUBLIC_V4]), RecordingBackend()
    hooks = sender(dns, backend)
    outcome = await hooks.send(delivery(url))
    await hooks.aclose()
    assert (outcome.error, outcome.permanent) == ("blocked_address", True)
    assert dns.asked == [] and backend.connects == []


@pytest.mark.parametrize("answer", [[], ResolutionFailed("nx")])
async def test_a_name_that_does_not_resolve_is_a_dns_error(answer: Any) -> None:
    dns, backend = FakeDns(answer), RecordingBackend()
    hooks = sender(dns, backend)
    outcome = await hooks.send(delivery("https://nowhere.example.com/"))
    await hooks.aclose()
    assert (outcome.error, outcome.permanent) == ("dns_error", False)
    assert backend.connects == []


async def test_the_guard_checks_literal_addresses_without_resolving() -> None:
    dns = FakeDns([PUBLIC_V4])
    guard = AddressGuard(STRICT, dns)
    assert await guard.addresses(PUBLIC_V4, 443) == [PUBLIC_V4]
    assert await guard.addresses(f"[{PUBLIC_V6}]", 443) == [PUBLIC_V6]
    for host in ("10.0.0.1", "::ffff:10.0.0.1", "[::1]", "localhost", "2852039166", "intranet"):
        with pytest.raises(BlockedAddress):
            await guard.addresses(host, 443)
    assert dns.asked == []


async def test_a_unix_socket_is_never_connected() -> None:
    # the sender's connector is a TCP connector (pinned), never a unix-socket one, and no proxy from the
    # environment stands between
    hooks = WebhookSender(2.0, BOX, DEV, guard=AddressGuard(DEV, FakeDns(["127.0.0.1"])))
    session = hooks.session
    assert isinstance(session.connector, PinnedConnector)
    assert not isinstance(session.connector, aiohttp.UnixConnector)
    assert session.trust_env is False
    await hooks.aclose()


async def test_a_literal_address_is_checked_by_the_connector_too() -> None:
    # below the URL policy's check: the connector asks the guard for every host, literals included
    dns, backend = FakeDns([PUBLIC_V4]), RecordingBackend()
    hooks = sender(dns, backend)
    await hooks.send(delivery(f"https://{PUBLIC_V4}/hook"))
    connector = hooks.session.connector
    assert isinstance(connector, PinnedConnector)
    with pytest.raises(BlockedAddress):
        await connector._resolve_host("10.0.0.1", 443)
    await hooks.aclose()
    assert backend.connects == [(PUBLIC_V4, 443)]
    assert dns.asked == []
