"""The address guard (pmd.netguard) and the resolver (pmd.resolver): what is refused, on the address connected to.

Traffic goes to loopback only. Names outside it (the metadata service, a 10.x name, a rebinding name) go through a
stub of socket.getaddrinfo that maps them to 127.0.0.2, where a trap server counts connections: 127.0.0.2 is not
in any allow-list here, so a broken guard would reach the trap (and fail the test), never the network.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pmd import resolver as resolver_mod
from pmd.download import DownloadOptions, download_chunk
from pmd.http_client import HttpClient, is_transient
from pmd.netguard import AddressGuard, classify, literal_address, parse_networks
from pmd.reasons import Reason, Stage
from pmd.resolver import ResolveError, Resolver
from tests.httpserver import LoopbackServer
from tests.loopback import LOOPBACK_NETWORKS, loopback_guard, loopback_options

TRAP_HOST = "127.0.0.2"  # not allowed anywhere in these tests
MAX_BYTES = 1 << 20


# ------------------------------------------------------------------------------------------------ classifier
@pytest.mark.parametrize("address, kind", [
    ("8.8.8.8", None), ("1.1.1.1", None), ("100.63.255.255", None), ("100.128.0.0", None), ("172.15.255.255", None),
    ("172.32.0.0", None), ("198.17.255.255", None), ("198.20.0.0", None), ("192.0.3.1", None),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"),
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"),
    ("10.0.0.5", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("169.254.0.1", "link-local"),
    ("100.64.0.1", "CGNAT"), ("100.127.255.255", "CGNAT"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.0.8", "reserved"),
    ("192.0.2.1", "documentation"), ("198.51.100.7", "documentation"), ("203.0.113.9", "documentation"),
    ("198.18.0.1", "benchmarking"), ("198.19.255.255", "benchmarking"),
    ("2606:4700:4700::1111", None), ("2a00:1450:4001::200e", None),
    ("::", "unspecified"), ("::1", "loopback"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("fc00::1", "unique-local"), ("fd12:3456::1", "unique-local"), ("fec0::1", "site-local"),
    ("ff02::1", "multicast"), ("2001:db8::1", "documentation"), ("100::1", "reserved"),
    ("::ffff:127.0.0.1", "loopback (IPv4-mapped)"), ("::ffff:169.254.169.254", "link-local (IPv4-mapped)"),
    ("::ffff:10.0.0.5", "private (IPv4-mapped)"), ("::ffff:8.8.8.8", None),
    ("::127.0.0.1", "loopback (IPv4-compatible)"), ("::10.0.0.5", "private (IPv4-compatible)"),
    ("::8.8.8.8", "reserved (IPv4-compatible)"),
    ("::ffff:0:10.0.0.5", "private (IPv4-translated)"),
    ("64:ff9b::10.0.0.5", "private (NAT64)"), ("64:ff9b::169.254.169.254", "link-local (NAT64)"),
    ("64:ff9b::8.8.8.8", None), ("64:ff9b:1::1", "private"),
    ("2002:a00:5::1", "private (6to4)"), ("2002:7f00:1::1", "loopback (6to4)"), ("2002:808:808::1", None),
])
def test_classify_every_range(address, kind):
    assert classify(address) == kind
    assert classify(ipaddress.ip_address(address.split("%")[0])) == kind


# Spellings of 127.0.0.1 and 10.0.0.5 that the C library reads as an IPv4 address (inet_aton's forms)
INTEGER_FORMS = ["2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "0177.1", "127.1", "127.0.1", "017700000001",
                 "127.0.0.01", "0x7F.0.0.1", "167772165", "10.5", "012.0.0.5"]


@pytest.mark.parametrize("host", INTEGER_FORMS)
def test_integer_hosts_mean_what_the_socket_layer_makes_of_them(host):
    ip = literal_address(host)
    assert ip is not None and classify(host) in ("loopback", "private")
    # The socket layer's reading (AI_NUMERICHOST: parsed, never a DNS query) is the same address: the one checked
    # is the one a connection would reach.
    infos = socket.getaddrinfo(host, 80, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    assert {ipaddress.ip_address(i[4][0]) for i in infos} == {ip}


@pytest.mark.parametrize("host, expected", [
    ("[::1]", "::1"), ("[::ffff:10.0.0.5]", "::ffff:a00:5"), ("10.0.0.5.", "10.0.0.5"), ("example.com", None),
    ("256.1.1.1", None), ("1.2.3.4.5", None), ("0x", None), ("12ab", None), ("metadata.google.internal", None),
])
def test_literal_address(host, expected):
    got = literal_address(host)
    assert (str(got) if got is not None else None) == expected
    try:  # the socket layer agrees: a numeric host where we see an address, a name (for DNS) where we do not
        numeric = socket.getaddrinfo(host.strip("[]").rstrip("."), 80, 0, socket.SOCK_STREAM, 0,
                                     socket.AI_NUMERICHOST)[0][4][0]
    except socket.gaierror:
        numeric = None
    assert (str(ipaddress.ip_address(numeric)) if numeric else None) == expected


def test_allow_list():
    guard = AddressGuard.from_strings(["127.0.0.1/32", "10.1.0.0/16"])
    assert guard.refusal("127.0.0.1") is None and guard.refusal("::ffff:127.0.0.1") is None
    assert guard.refusal("127.0.0.2") == "loopback" and guard.refusal("10.2.0.1") == "private"
    assert guard.refusal("10.1.200.3") is None and guard.refusal("8.8.8.8") is None
    assert AddressGuard().refusal("127.0.0.1") == "loopback"
    assert [str(n) for n in parse_networks(["127.0.0.1", "10.1.2.3/16", "::1"])] == \
        ["127.0.0.1/32", "10.1.0.0/16", "::1/128"]
    for bad in (["10.0.0.0/33"], ["not-a-network"], ["10.0.0.0/8 "], [8]):
        if bad == ["10.0.0.0/8 "]:
            assert parse_networks(bad)  # surrounding blanks are forgiven
            continue
        with pytest.raises(ValueError, match="allow_networks"):
            DownloadOptions(allow_networks=bad)
    assert DownloadOptions(allow_networks=["127.0.0.1"]).allow_networks == ["127.0.0.1/32"]


def test_a_bad_cidr_in_a_build_config_is_a_config_error(tmp_path):
    from pipelines.build import load_config
    from pmd.config_loader import ConfigError

    config = tmp_path / "build.toml"
    config.write_text('[download]\nallow_networks = ["10.0.0.0/40"]\n[[sources]]\nname = "conceptual_12m"\n'
                      'inputs = ["x.tsv"]\n')
    with pytest.raises(ConfigError, match=r"download.*10\.0\.0\.0/40"):
        load_config(config, {"out": str(tmp_path / "o")})


# ------------------------------------------------------------------------------------------- stub resolver
STUB_NAMES = {  # name -> the answers of successive lookups (the last one repeats)
    "metadata.google.internal": [[TRAP_HOST]],
    "169.254.169.254.nip.io": [[TRAP_HOST]],  # a name that would resolve to the metadata address
    "intranet.corp.example": [[TRAP_HOST]],  # a name that would resolve to 10.x
    "dual.example": [[TRAP_HOST, "127.0.0.1"]],  # one refused and one allowed address
    "rebind.example": [["127.0.0.1"], [TRAP_HOST]],  # allowed first, then rebinds to a refused address
}


@pytest.fixture
def stub_dns(monkeypatch):
    """socket.getaddrinfo that answers STUB_NAMES (and NXDOMAIN / SERVFAIL names), counting name lookups; IP
    literals and localhost go to the real one (no DNS query: parsed, or /etc/hosts)."""
    real = socket.getaddrinfo
    calls: dict[str, int] = {}

    def fake(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name in STUB_NAMES or name in ("gone.example", "servfail.example"):
            calls[name] = calls.get(name, 0) + 1
            if name == "gone.example":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            if name == "servfail.example":
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            answers = STUB_NAMES[name]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0))
                    for a in answers[min(calls[name], len(answers)) - 1]]
        if literal_address(name or "") is None and name != "localhost":
            raise AssertionError(f"a test looked up {name!r} outside the stub")
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    resolver_mod.clear_caches()
    yield calls
    resolver_mod.clear_caches()


class _Redirect(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        with self.server.lock:
            self.server.seen.append(self.path)
        if self.path == "/robots.txt":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(302)
        self.send_header("Location", self.server.targets[self.path])
        self.send_header("Content-Length", "0")
        self.end_headers()


class RedirectServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, targets: dict[str, str]):
        super().__init__(("127.0.0.1", 0), _Redirect)
        self.targets, self.seen, self.lock = targets, [], threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def stop(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def servers():
    """A good server on 127.0.0.1 and a trap on 127.0.0.2 at the same port (so a rebound name reaches it)."""
    good = LoopbackServer(image_size=(64, 48), sleep_s=2.0).start()
    trap = LoopbackServer(image_size=(64, 48), sleep_s=2.0, host=TRAP_HOST, port=good.server_address[1]).start()
    yield good, trap
    good.stop()
    trap.stop()


def test_without_an_allow_list_loopback_and_localhost_fail_and_the_server_sees_nothing(servers, tmp_path):
    good, _ = servers
    port = good.server_address[1]
    urls = [good.url("/img/1.jpg"), f"http://localhost:{port}/img/2.jpg", f"http://2130706433:{port}/img/3.jpg",
            f"http://0x7f.1:{port}/img/4.jpg", f"http://[::ffff:127.0.0.1]:{port}/img/5.jpg"]
    got = list(download_chunk([str(i) for i in range(len(urls))], urls, DownloadOptions(timeout=2.0), tmp_path / "w"))
    assert [d.reason for d in got] == [Reason.BLOCKED_ADDRESS] * len(urls)
    assert all("loopback" in d.detail for d in got), [d.detail for d in got]
    assert "localhost" in got[1].detail and "2130706433 (127.0.0.1)" in got[2].detail
    assert good.connections == 0


def test_names_that_resolve_to_refused_addresses_fail_and_the_trap_sees_nothing(servers, stub_dns, tmp_path):
    good, trap = servers
    port = good.server_address[1]
    names = ["metadata.google.internal", "169.254.169.254.nip.io", "intranet.corp.example"]
    urls = [f"http://{n}:{port}/img/{i}.jpg" for i, n in enumerate(names)] + [f"http://dual.example:{port}/img/9.jpg"]
    got = list(download_chunk(names + ["dual"], urls, loopback_options(timeout=2.0), tmp_path / "w"))
    assert [d.reason for d in got] == [Reason.BLOCKED_ADDRESS] * 3 + [None]
    for name, d in zip(names, got):
        assert d.detail.startswith(f"{name} ({TRAP_HOST}) is a loopback address"), d.detail
    assert trap.connections == 0 and good.connections >= 1  # dual.example: only its allowed address is used


def test_a_rebinding_name_is_connected_to_at_the_address_checked(servers, stub_dns):
    good, trap = servers
    url = f"http://rebind.example:{good.server_address[1]}/img/1.jpg"
    client = HttpClient(max_per_host=1, guard=loopback_guard(), resolver=Resolver())
    assert client.fetch(url, 2.0, MAX_BYTES, []).reason is None
    # One lookup for the check and the connection: the socket connected to the checked address, no second answer.
    assert stub_dns["rebind.example"] == 1 and trap.connections == 0 and good.connections == 1
    # The next lookup (a new cache) answers the refused address: refused, before any packet.
    fresh = HttpClient(max_per_host=1, guard=loopback_guard(), resolver=Resolver())
    got = fresh.fetch(url, 2.0, MAX_BYTES, [])
    assert got.reason == "blocked_address" and TRAP_HOST in got.detail
    assert stub_dns["rebind.example"] == 2 and trap.connections == 0


def test_a_redirect_to_a_refused_address_fails_and_the_second_server_sees_nothing(servers, tmp_path):
    good, trap = servers
    redirect = RedirectServer({"/to-trap.jpg": trap.url("/img/1.jpg"), "/to-good.jpg": good.url("/img/2.jpg"),
                               "/to-file.jpg": "file:///etc/hostname", "/to-ftp.jpg": "ftp://127.0.0.1/x.jpg"})
    try:
        urls = [redirect.url(p) for p in ("/to-trap.jpg", "/to-good.jpg", "/to-file.jpg", "/to-ftp.jpg")]
        got = list(download_chunk(["trap", "good", "file", "ftp"], urls,
                                  DownloadOptions(timeout=2.0, allow_networks=["127.0.0.1/32"]), tmp_path / "w"))
    finally:
        redirect.stop()
    assert [d.reason for d in got] == [Reason.BLOCKED_ADDRESS, None, "download_error", "download_error"]
    assert got[0].detail.startswith(f"{TRAP_HOST} is a loopback address"), got[0].detail
    # The redirect's target is refused before any request: only http and https are followed.
    assert "'file'" in got[2].detail and "'ftp'" in got[3].detail
    assert trap.connections == 0 and good.connections == 1


def test_dns_failures_nxdomain_is_permanent_a_resolver_failure_transient(stub_dns, tmp_path):
    got = list(download_chunk(["a", "b", "c"], ["http://gone.example/x.jpg", "http://servfail.example/x.jpg",
                                                "http://gone.example/y.jpg"],
                              loopback_options(timeout=2.0, retries=1), tmp_path / "w"))
    assert [d.reason for d in got] == [Reason.DNS_NXDOMAIN, Reason.DNS_ERROR, Reason.DNS_NXDOMAIN]
    assert not is_transient(Reason.DNS_NXDOMAIN) and is_transient(Reason.DNS_ERROR)
    assert stub_dns["gone.example"] == 1  # cached: the second URL of the name asked nothing
    assert "gone.example" in got[0].detail


def test_img2dataset_backend_prechecks_hosts_and_warns(servers, stub_dns, tmp_path, caplog):
    good, trap = servers
    port = good.server_address[1]
    with caplog.at_level(logging.WARNING, logger="pmd.download"):
        options = loopback_options(backend="img2dataset", thread_count=4, timeout=2.0)
    assert sum("img2dataset" in r.getMessage() and "redirects" in r.getMessage() for r in caplog.records) == 1
    urls = [good.url("/img/1.jpg"), f"http://metadata.google.internal:{port}/img/2.jpg", "file:///etc/hostname",
            "http://gone.example/x.jpg", f"http://0177.0.0.2:{port}/img/3.jpg"]
    got = list(download_chunk(["ok", "meta", "file", "gone", "octal"], urls, options, tmp_path / "w"))
    assert [d.reason for d in got] == [None, Reason.BLOCKED_ADDRESS, "download_error", Reason.DNS_NXDOMAIN,
                                       Reason.BLOCKED_ADDRESS]
    assert "metadata.google.internal (127.0.0.2) is a loopback address" in got[1].detail
    assert trap.connections == 0 and good.connections == 1


def test_resolver_bounds_concurrent_lookups(monkeypatch):
    import time

    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def slow(host, port, *args):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    r = Resolver(concurrency=2, timeout=2.0)
    threads = [threading.Thread(target=r.resolve, args=(f"n{i % 6}.example",)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["peak"] == 2 and r.lookups == 6  # 6 names, each looked up once however many asked at once


def test_resolver_times_out(monkeypatch):
    import time

    release = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: release.wait(5) and [])
    r = Resolver(timeout=0.2)
    started = time.monotonic()
    with pytest.raises(ResolveError) as e:
        r.resolve("hang.example")
    release.set()
    assert e.value.reason == Reason.DNS_ERROR and time.monotonic() - started < 1.5


def test_reasons_are_members():
    assert {Reason.BLOCKED_ADDRESS, Reason.DNS_NXDOMAIN, Reason.DNS_ERROR} <= set(Reason)
    assert Stage.DOWNLOAD == "download" and LOOPBACK_NETWORKS == ("127.0.0.1/32", "::1/128")


# -------------------------------------------------------------------------------------------- pmd build, e2e
def _outcome(out) -> dict[str, tuple[str, str, str]]:
    """caption's row -> (stage, reason, detail) of its failure, or ("shard", "", "") for a shard row."""
    import polars as pl

    from pmd import schema

    failures = pl.read_parquet(out / "failures")
    got = {r[schema.IMAGE_URL]: (r[schema.STAGE], r[schema.REASON], r[schema.DETAIL])
           for r in failures.iter_rows(named=True)}
    if list((out / "shards").glob("*.parquet")):
        shards = pl.read_parquet(out / "shards")
        got.update({u: ("shard", "", "") for u in shards.get_column(schema.IMAGE_URL).to_list()})
    return got


@pytest.mark.slow
def test_pmd_build_refuses_loopback_unless_allowed_on_the_command_line(servers, stub_dns, tmp_path):
    from pmd_cli.pmd import main

    good, trap = servers
    port = good.server_address[1]
    redirect = RedirectServer({"/to-trap.jpg": trap.url("/img/3.jpg")})
    urls = {"good": good.url("/img/1.jpg"), "localhost": f"http://localhost:{port}/img/2.jpg",
            "redirect": redirect.url("/to-trap.jpg"), "metadata": f"http://metadata.google.internal:{port}/img/4.jpg",
            "integer": f"http://2130706434:{port}/img/5.jpg"}  # 127.0.0.2, the trap, as one integer
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("".join(f"{u}\ta photo of the {name} case\n" for name, u in urls.items()))
    common = ["build", "conceptual_12m", str(tsv), "--executor", "local", "--timeout", "2", "-q"]
    try:
        assert main([*common, "--out", str(tmp_path / "closed")]) == 0
        closed = _outcome(tmp_path / "closed")
        assert {u: closed[u][:2] for u in urls.values()} == {u: (Stage.DOWNLOAD, Reason.BLOCKED_ADDRESS)
                                                             for u in urls.values()}
        assert good.connections == 0 and trap.connections == 0 and redirect.seen == []

        assert main([*common, "--out", str(tmp_path / "open"), "--allow-network", "127.0.0.1/32"]) == 0
        opened = _outcome(tmp_path / "open")
    finally:
        redirect.stop()
    assert opened[urls["good"]][0] == opened[urls["localhost"]][0] == "shard"
    for name in ("redirect", "metadata", "integer"):
        stage, reason, detail = opened[urls[name]]
        assert (stage, reason) == (Stage.DOWNLOAD, Reason.BLOCKED_ADDRESS) and "loopback" in detail, (name, detail)
    assert "127.0.0.2 is a loopback address" in opened[urls["redirect"]][2]  # the redirect hop, refused
    assert redirect.seen == ["/robots.txt", "/to-trap.jpg"] and trap.connections == 0  # the second saw nothing
    manifest = __import__("json").loads((tmp_path / "open" / "manifest.json").read_text())
    assert manifest["config"]["download"]["allow_networks"] == ["127.0.0.1/32"]


@pytest.mark.slow
def test_a_resolver_failure_is_retried_by_retry_failures(servers, stub_dns, tmp_path, monkeypatch):
    from pipelines.build import run_build
    from tests.pipelines.build_fixtures import url_build_config

    good, _ = servers
    url = f"http://flaky-dns.example:{good.server_address[1]}/img/7.jpg"
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text(f"{url}\ta photo behind a flaky resolver\nhttp://gone.example/x.jpg\ta photo of nothing\n")
    answer = {"flaky-dns.example": "servfail"}
    real_fake = socket.getaddrinfo

    def fake(host, port, *args):
        if host == "flaky-dns.example":
            if answer["flaky-dns.example"] == "servfail":
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]
        return real_fake(host, port, *args)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    out = tmp_path / "out"
    first = run_build(url_build_config("conceptual_12m", [tsv], out, executor="local"))
    assert first["accounting"]["conceptual_12m"]["failures_by_reason"] == {"dns_error": 1, "dns_nxdomain": 1}
    answer["flaky-dns.example"] = "answers"
    resolver_mod.clear_caches()  # a new `pmd build` process starts with an empty cache
    second = run_build(url_build_config("conceptual_12m", [tsv], out, executor="local", retry_failures=True))
    acc = second["accounting"]["conceptual_12m"]
    assert acc["failures_by_reason"] == {"dns_nxdomain": 1} and acc["pairs"] == 1  # NXDOMAIN is not retried


# ----------------------------------------------------------------------------------------- pmd fetch-metadata
CC12M_PATH = "/storage.googleapis.com/conceptual_12m/cc12m.tsv"  # the catalog's cc12m.tsv under a --mirror


def test_fetch_metadata_admits_the_mirror_and_refuses_a_redirect_from_it(servers, stub_dns, tmp_path, monkeypatch):
    from pmd.fetch import fetch

    good, trap = servers
    STUB = {**STUB_NAMES, "mirror.internal": [["127.0.0.1"]]}
    monkeypatch.setattr(sys.modules[__name__], "STUB_NAMES", STUB)
    # A mirror named by a name that resolves to loopback: admitted for this command (the server answers 404 for the
    # path: a request reached it).
    summary = fetch(tmp_path / "a", ["conceptual_12m"], mirror=f"http://mirror.internal:{good.server_address[1]}",
                    attempts=1, progress=False)
    assert summary["failed"] == {"cc12m.tsv": f"http://mirror.internal:{good.server_address[1]}{CC12M_PATH}: HTTP 404"}
    assert good.connections == 1
    # The mirror redirects to 127.0.0.2: refused, at once (not retried), and the second server sees nothing.
    redirect = RedirectServer({CC12M_PATH: trap.url("/cc12m.tsv")})
    try:
        summary = fetch(tmp_path / "b", ["conceptual_12m"], mirror=redirect.url(""), attempts=5, progress=False)
    finally:
        redirect.stop()
    assert summary["failed"]["cc12m.tsv"].startswith("blocked_address: 127.0.0.2 is a loopback address")
    assert redirect.seen == [CC12M_PATH] and trap.connections == 0
    # Without --mirror (or --allow-network) nothing of loopback is admitted.
    from pmd.fetch import _guard

    assert _guard(None, []).refusal("127.0.0.1") == "loopback"
    assert _guard(None, ["127.0.0.1/32"]).refusal("127.0.0.1") is None
