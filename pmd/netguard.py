"""The address guard: a download connects only to globally routable addresses, unless an allow-list admits more.

A build runs on cloud machines that can reach the cloud's metadata service (169.254.169.254), internal services
and other nodes, and its 60M URLs come from upstream metadata nobody here controls: a URL (or a redirect) to
`http://10.0.0.5/...` must not be fetched, and an internal image must not become a row of a published corpus.
Crawlers that publish what they fetch (StormCrawler, Nutch) refuse such addresses at connection time; so does
this module, for the `http` backend's connections (pmd.http_client), `pmd fetch-metadata` and the img2dataset
backend's pre-check.

What is refused is decided on the address itself, after DNS, never on the URL's text: a URL-pattern filter misses
`http://2130706433/`, `http://0x7f.1/`, `http://[::ffff:10.0.0.5]/` or a name that resolves to 10.0.0.5.
`classify` names the kind of a non-global address from the table below (checked in order; the first match
names it), and anything else Python's `ipaddress` does not hold global is `reserved`. IPv6 forms that carry an
IPv4 address (IPv4-mapped ::ffff:a.b.c.d, which a dual-stack socket connects to as IPv4; IPv4-compatible ::a.b.c.d;
SIIT ::ffff:0:a.b.c.d; NAT64 64:ff9b::/96 and 6to4 2002::/16, which a gateway or relay on the path translates to
that IPv4 address) are judged by the IPv4 address they carry.

Host spellings: a URL host made of decimal, octal (leading 0) or hex (0x) numbers, one to four dot-separated parts
(`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`), is an IPv4 address to the C library's inet_aton and getaddrinfo,
which is what a socket connects to; `literal_address` reads it the same way (with inet_aton itself), so the guard
checks the address the connection would reach and no DNS query is sent for such a host.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from pmd.reasons import Reason

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BLOCKED_ADDRESS = Reason.BLOCKED_ADDRESS.value  # the failure reason of a refused row
SCHEMES: tuple[str, ...] = ("http", "https")  # the only URL schemes fetched or followed in a redirect

# (network, kind): the ranges refused, RFC 6890's special-purpose registries and the cloud/CGNAT ranges crawlers
# exclude. Order matters only where ranges nest (none of these do, except the catch-all `reserved` after them).
BLOCKED_RANGES: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),  # "this network"; 0.0.0.0 reaches the local host on Linux
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("169.254.0.0/16", "link-local"),  # the cloud metadata service 169.254.169.254
    ("100.64.0.0/10", "CGNAT"),  # shared address space (RFC 6598): carrier NAT, also cloud-internal networks
    ("192.0.0.0/24", "reserved"),  # IETF protocol assignments (RFC 6890)
    ("192.0.2.0/24", "documentation"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # includes the broadcast address 255.255.255.255
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),  # deprecated (RFC 3879), still routed inside some networks
    ("fc00::/7", "unique-local"),  # IPv6 ULA, the private ranges of IPv6
    ("ff00::/8", "multicast"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),  # RFC 9637
    ("100::/64", "reserved"),  # discard-only
    ("64:ff9b:1::/48", "private"),  # local-use NAT64 (RFC 8215)
)
_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple((ipaddress.ip_network(n), k) for n, k in BLOCKED_RANGES)

# IPv6 prefixes whose addresses carry an IPv4 address: (network, name, where the IPv4 address sits)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")

_NUMERIC_HOST = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}$", re.IGNORECASE)


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host stands for when it is an IP literal in any spelling a socket accepts, else None
    (a name for DNS). `[::1]`, `::ffff:10.0.0.5`, `10.0.0.5`, `2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`."""
    host = host.strip().removeprefix("[").removesuffix("]").rstrip(".")
    if "%" in host:  # an IPv6 zone index (fe80::1%eth0): the address is what matters
        host = host.split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        try:
            # inet_aton: the reading getaddrinfo gives these forms, so the address checked is the one connected to
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None  # e.g. a part too large (256.1.1.1): getaddrinfo refuses it too
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip in _SIIT:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "IPv4-translated"
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "IPv4-compatible"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    return None


def classify(ip: IPAddress | str) -> str | None:
    """The kind of a non-globally-routable address (`loopback`, `private`, `link-local`, `CGNAT`, ...), or None
    for an address a download may connect to. IPv6 forms carrying an IPv4 address are judged by that address."""
    if isinstance(ip, str):
        parsed = literal_address(ip)
        if parsed is None:
            raise ValueError(f"{ip!r} is not an IP address")
        ip = parsed
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            v4, form = embedded
            kind = classify(v4)
            if form == "IPv4-compatible" and kind is None:
                kind = "reserved"  # deprecated (RFC 4291): no host is reached that way on purpose
            return f"{kind} ({form})" if kind is not None else None
    for network, kind in _RANGES:
        if ip.version == network.version and ip in network:
            return kind
    if not ip.is_global:
        return "reserved"
    return None


def parse_networks(values: Iterable[str], what: str = "allow_networks") -> tuple[IPNetwork, ...]:
    """CIDR strings (`10.1.0.0/16`, `127.0.0.1/32`, `::1/128`; a bare address is a /32 or /128) as networks;
    ValueError naming the bad one."""
    networks = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"{what}: expected a CIDR string such as 10.1.0.0/16, got {value!r}")
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"{what}: {value!r} is not a CIDR network such as 10.1.0.0/16 ({e})") from None
    return tuple(networks)


class BlockedAddress(Exception):
    """A connection refused by the guard: `host` resolved to (or is) `address`, of kind `kind`."""

    def __init__(self, host: str, address: str, kind: str):
        self.host, self.address, self.kind = host, address, kind
        shown = host if host == address else f"{host} ({address})"
        super().__init__(f"{shown} is a {kind} address: not connected (docs/build.md, Network safety; "
                         "admit a network with --allow-network CIDR)")


@dataclass(frozen=True)
class AddressGuard:
    """What a process may connect to: every globally routable address, plus the `allowed` networks."""

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_strings(cls, networks: Iterable[str]) -> AddressGuard:
        return cls(parse_networks(networks))

    def refusal(self, address: IPAddress | str) -> str | None:
        """The kind of `address` if a connection to it is refused, None if it may be connected to."""
        ip = literal_address(address) if isinstance(address, str) else address
        if ip is None:
            raise ValueError(f"{address!r} is not an IP address")
        if ip.version == 6 and ip.scope_id:
            ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)  # ::ffff:127.0.0.1 is 127.0.0.1 to a dual-stack socket
        for net in self.allowed:
            if any(c.version == net.version and c in net for c in candidates):
                return None
        return classify(ip)

    def check(self, host: str, address: str) -> None:
        """Raise BlockedAddress unless `address` (what `host` resolved to) may be connected to."""
        kind = self.refusal(address)
        if kind is not None:
            raise BlockedAddress(host, address, kind)

    def admit(self, addresses: Iterable[str]) -> AddressGuard:
        """This guard with `addresses` (each one host) admitted too: `pmd fetch-metadata --mirror`'s host."""
        extra = tuple(ipaddress.ip_network(a) for a in addresses)
        return AddressGuard(self.allowed + tuple(n for n in extra if n not in self.allowed))


def scheme_allowed(scheme: str | None) -> bool:
    return (scheme or "").lower() in SCHEMES
