"""`--resolver ADDR` (pmd.resolver with dnspython) against a tiny DNS responder on 127.0.0.1 that counts queries:
answers are cached, NXDOMAIN is permanent, SERVFAIL and silence are `dns_error` within the timeout."""

from __future__ import annotations

import socket
import threading
import time

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from pmd import resolver as resolver_mod
from pmd.download import download_chunk
from pmd.reasons import Reason
from pmd.resolver import ResolveError, Resolver, parse_nameserver
from tests.httpserver import LoopbackServer
from tests.loopback import loopback_options

ZONE = {"img.test.": "127.0.0.1", "trap.test.": "127.0.0.2"}  # A records; no AAAA anywhere


class Responder:
    """A UDP DNS server on 127.0.0.1: ZONE's A records, NXDOMAIN for gone.test, SERVFAIL for broken.test, no
    answer at all for slow.test. `queries` counts (name, type) asked."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.queries: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            query = dns.message.from_wire(data)
            question = query.question[0]
            name, rdtype = question.name.to_text().lower(), question.rdtype
            with self.lock:
                key = (name, dns.rdatatype.to_text(rdtype))
                self.queries[key] = self.queries.get(key, 0) + 1
            if name == "slow.test.":
                continue
            response = dns.message.make_response(query)
            if name == "gone.test.":
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif name == "broken.test.":
                response.set_rcode(dns.rcode.SERVFAIL)
            elif name in ZONE and rdtype == dns.rdatatype.A:
                response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", ZONE[name]))
            self.sock.sendto(response.to_wire(), peer)

    def asked(self, name: str) -> int:
        with self.lock:
            return sum(n for (q, _), n in self.queries.items() if q == name)

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def responder():
    r = Responder()
    resolver_mod.clear_caches()
    yield r
    r.stop()
    resolver_mod.clear_caches()


def test_answers_are_cached_and_failures_told_apart(responder):
    r = Resolver(nameserver=responder.address, timeout=0.5)
    assert [r.resolve("img.test") for _ in range(3)] == [["127.0.0.1"]] * 3
    assert responder.queries == {("img.test.", "A"): 1, ("img.test.", "AAAA"): 1} and r.lookups == 1
    for _ in range(2):
        with pytest.raises(ResolveError) as e:
            r.resolve("gone.test")
        assert e.value.reason == Reason.DNS_NXDOMAIN
    assert responder.asked("gone.test.") == 1  # NXDOMAIN remembered: permanent
    with pytest.raises(ResolveError) as e:
        r.resolve("broken.test")
    assert e.value.reason == Reason.DNS_ERROR
    started = time.monotonic()
    with pytest.raises(ResolveError) as e:
        r.resolve("slow.test")
    assert e.value.reason == Reason.DNS_ERROR and time.monotonic() - started < 1.5
    assert r.resolve("0x7f.1") == ["127.0.0.1"] and responder.asked("0x7f.1.") == 0  # an IP literal: no query


def test_download_through_the_given_resolver(responder, tmp_path):
    good = LoopbackServer(image_size=(64, 48), sleep_s=2.0).start()
    port = good.server_address[1]
    trap = LoopbackServer(image_size=(64, 48), sleep_s=2.0, host="127.0.0.2", port=port).start()
    try:
        urls = [f"http://img.test:{port}/img/{i}.jpg" for i in range(5)] + [
            f"http://trap.test:{port}/img/9.jpg", "http://gone.test/x.jpg", "http://broken.test/x.jpg"]
        got = list(download_chunk([str(i) for i in range(len(urls))], urls,
                                  loopback_options(timeout=2.0, thread_count=4, resolver=responder.address,
                                                   dns_timeout=0.5), tmp_path / "w"))
    finally:
        good.stop()
        trap.stop()
    assert [d.reason for d in got] == [None] * 5 + [Reason.BLOCKED_ADDRESS, Reason.DNS_NXDOMAIN, Reason.DNS_ERROR]
    assert "trap.test (127.0.0.2) is a loopback address" in got[5].detail
    # Five URLs of img.test, their robots.txt and keep-alive connections: one A and one AAAA query in all.
    assert responder.queries[("img.test.", "A")] == 1 and responder.queries[("img.test.", "AAAA")] == 1
    assert trap.connections == 0


def test_resolver_addresses_and_flags(tmp_path):
    from pmd.download import DownloadOptions
    from pmd_cli.pmd import _build_config, build_parser

    assert parse_nameserver("127.0.0.53") == ("127.0.0.53", 53)
    assert parse_nameserver("10.0.0.2:5353") == ("10.0.0.2", 5353)
    assert parse_nameserver("[::1]:5300") == ("::1", 5300) and parse_nameserver("::1") == ("::1", 53)
    for bad in ("dns.google", "10.0.0.2:0", "10.0.0.2:x", "[::1]5300"):
        with pytest.raises(ValueError, match="resolver"):
            DownloadOptions(resolver=bad)
    for bad in ({"dns_timeout": 0}, {"dns_concurrency": 0}):
        with pytest.raises(ValueError, match="dns_"):
            DownloadOptions(**bad)
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("http://img.test/x.jpg\ta caption\n")
    d = _build_config(build_parser().parse_args(
        ["build", "conceptual_12m", str(tsv), "--out", str(tmp_path / "o"), "--resolver", "127.0.0.1:5353",
         "--dns-timeout", "2", "--allow-network", "10.1.0.0/16", "--allow-network", "127.0.0.1"])).download
    assert (d.resolver, d.dns_timeout, d.allow_networks) == ("127.0.0.1:5353", 2.0, ["10.1.0.0/16", "127.0.0.1/32"])
    assert "resolver" not in d.to_dict() and d.to_dict()["allow_networks"] == ["10.1.0.0/16", "127.0.0.1/32"]
    d = _build_config(build_parser().parse_args(["build", "conceptual_12m", str(tsv), "--out", "o"])).download
    assert d.allow_networks == [] and d.resolver is None
