"""Host budgets (pmd.politeness), robots.txt (pmd.robots) and placeholders (pmd.placeholders) on loopback."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import polars as pl
import pytest

from pmd import placeholders, politeness, robots, schema
from pmd.download import DownloadOptions, download_chunk
from pmd.http_client import is_transient
from pmd_demo.drawings import numbered_jpeg as jpeg
from tests.loopback import loopback_options
from tests.politeserver import PoliteServer, grey_png


@pytest.fixture
def server():
    srv = PoliteServer(image_size=(16, 16)).start()
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------------------------ budget keys
@pytest.mark.parametrize("url, key", [
    ("https://farm3.staticflickr.com/2/1_a.jpg", "flickr"),
    ("https://live.staticflickr.com/65535/1_b.jpg", "flickr"),
    ("http://FARM66.STATICFLICKR.COM./x.jpg", "flickr"),
    ("https://xstaticflickr.com/x.jpg", "xstaticflickr.com"),  # a suffix match is on a label boundary
    ("https://lh3.googleusercontent.com/x", "googleusercontent"),
    ("https://upload.wikimedia.org/a/b.jpg", "upload.wikimedia.org"),
    ("https://storage.googleapis.com/b/x.jpg", "storage.googleapis.com"),
    ("http://127.0.0.1:8080/x.jpg", "127.0.0.1:8080"),  # another port: another server
    ("https://example.org:443/x.jpg", "example.org"),
    ("http://[::1]:81/x", "[::1]:81"),
])
def test_budget_keys_group_a_cdn_and_else_name_the_host(url, key):
    assert politeness.budget_key(url) == key


# -------------------------------------------------------------------------------------------------- budgets
def test_leases_are_bounded_per_key_and_come_back():
    b = politeness.HostBudgets(max_per_host=2)
    first = [b.acquire("h", "c", 0.0), b.acquire("h", "c", 0.0)]
    assert None not in first
    assert b.acquire("h", "c", 0.05) is None  # full
    assert b.acquire("other", "c", 0.0) is not None  # another key has its own slots
    threading.Timer(0.1, b.release, (first[0],)).start()
    started = time.monotonic()
    assert b.acquire("h", "c", 2.0) is not None  # woken by the release
    assert 0.08 < time.monotonic() - started < 1.0


def test_rate_spaces_the_grants_and_a_pause_stops_them():
    b = politeness.HostBudgets(max_per_host=100, max_rate_per_host=20.0)
    started = time.monotonic()
    leases = [b.acquire("h", "c", 5.0) for _ in range(11)]
    assert 0.49 < time.monotonic() - started < 1.5  # 10 intervals of 50 ms
    b.release(leases[0], pause=0.4)
    started = time.monotonic()
    assert b.acquire("h", "c", 5.0) is not None
    assert time.monotonic() - started >= 0.39
    b2 = politeness.HostBudgets(max_per_host=1, max_pause=0.1)
    b2.release(b2.acquire("h", "c", 0.0), pause=30.0)  # capped at max_pause
    started = time.monotonic()
    b2.acquire("h", "c", 5.0)
    assert time.monotonic() - started < 0.5


def test_a_gone_client_and_an_expired_lease_give_their_slots_back():
    b = politeness.HostBudgets(max_per_host=2, ttl=0.3)
    b.acquire("h", "dead", 0.0)
    b.acquire("h", "live", 0.0)
    assert b.drop_client("dead") == 1
    assert b.in_use("h") == 1
    assert b.acquire("h", "live", 0.0) is not None
    assert b.acquire("h", "live", 0.05) is None
    assert b.acquire("h", "live", 2.0) is not None  # after 0.3 s both expired
    assert b.in_use("h") == 1


def test_the_server_bounds_every_client_together_and_frees_a_dead_ones_leases():
    """Two clients (as two processes would), 8 threads each, max_per_host 3: never more than 3 leases out."""
    service = politeness.start_service(3, 0.0, 30.0, 5.0)
    try:
        clients = [politeness.RemoteBudget(service.address) for _ in range(2)]
        lock, state = threading.Lock(), {"now": 0, "peak": 0}

        def work(client: politeness.RemoteBudget) -> None:
            for _ in range(6):
                lease = client.acquire("h")
                with lock:
                    state["now"] += 1
                    state["peak"] = max(state["peak"], state["now"])
                time.sleep(0.01)
                with lock:
                    state["now"] -= 1
                client.release(lease)

        threads = [threading.Thread(target=work, args=(c,)) for c in clients for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert state["peak"] == 3
        # A client that dies holding 3 leases: its connections close, the server gives them back.
        dying = politeness.RemoteBudget(service.address)
        for _ in range(3):
            dying.acquire("h")
        dying.close()
        started = time.monotonic()
        leases = [clients[0].acquire("h") for _ in range(3)]
        assert len(set(leases)) == 3 and time.monotonic() - started < 1.5
    finally:
        service.stop()
    assert service.process.returncode is not None
    with pytest.raises(politeness.BudgetUnavailable):
        politeness.RemoteBudget(service.address).acquire("h")


# --------------------------------------------------------------------------------------------------- robots
ROBOTS = "User-agent: *\nDisallow: /private/\n\nUser-agent: otherbot\nDisallow: /\n"


def test_robots_disallowed_urls_fail_unrequested_and_robots_txt_is_fetched_once(tmp_path):
    srv = PoliteServer(image_size=(16, 16), robots_txt=ROBOTS, robots_status=200).start()
    try:
        paths = [f"/img/{i}.jpg" for i in range(6)] + [f"/private/{i}.jpg" for i in range(4)]
        opts = loopback_options(timeout=2.0, thread_count=8)
        got = list(download_chunk(paths, [srv.url(p) for p in paths], opts, tmp_path / "w", state_dir=tmp_path))
        assert [d.reason for d in got] == [None] * 6 + [robots.ROBOTS_DISALLOWED] * 4
        assert got[6].detail == f"disallowed by {robots.origin(srv.url('/'))}/robots.txt for pmd"
        assert srv.requests("/private/") == []
        assert len(srv.requests("/robots.txt")) == 1
        [stored] = (tmp_path / robots.ROBOTS_DIR).glob("*.json")
        record = json.loads(stored.read_text())
        assert record["status"] == 200 and record["body"] == ROBOTS and abs(record["fetched_at"] - time.time()) < 60
        # Another chunk of this process, and another process (a new cache over the same directory): no request.
        list(download_chunk(["/img/9.jpg"], [srv.url("/img/9.jpg")], opts, tmp_path / "w", state_dir=tmp_path))
        other = robots.Robots("pmd", tmp_path / robots.ROBOTS_DIR)
        assert other.check(srv.url("/private/x.jpg"), lambda url: pytest.fail("fetched again")) is not None
        assert len(srv.requests("/robots.txt")) == 1
        # The build's token picks its group: otherbot may fetch nothing.
        [d] = download_chunk(["k"], [srv.url("/img/1.jpg")], loopback_options(user_agent_token="otherbot"),
                             tmp_path / "w", state_dir=tmp_path)
        assert d.reason == robots.ROBOTS_DISALLOWED
        # --ignore-robots: everything is asked for.
        [d] = download_chunk(["k"], [srv.url("/private/1.jpg")], loopback_options(respect_robots_txt=False),
                             tmp_path / "w")
        assert d.reason == "http_404" and len(srv.requests("/private/")) == 1
    finally:
        srv.stop()


@pytest.mark.parametrize("status, reason", [(404, None), (403, None), (500, robots.ROBOTS_UNAVAILABLE),
                                            (503, robots.ROBOTS_UNAVAILABLE)])
def test_robots_4xx_allows_all_and_5xx_disallows_for_now(tmp_path, status, reason):
    srv = PoliteServer(image_size=(16, 16), robots_txt="User-agent: *\nDisallow: /\n", robots_status=status).start()
    try:
        [d] = download_chunk(["k"], [srv.url("/img/3.jpg")], loopback_options(timeout=2.0), tmp_path / "w",
                             state_dir=tmp_path)
        assert d.reason == reason
        assert len(srv.requests("/img/")) == (1 if reason is None else 0)
        if reason:
            assert is_transient(reason)  # --retry-failures asks again
            assert not (tmp_path / robots.ROBOTS_DIR).exists()  # never stored: a later attempt fetches again
        else:
            assert d.data == jpeg(3, 16, 16)
    finally:
        srv.stop()


def test_an_unreachable_robots_txt_fails_the_rows_with_the_fetchs_reason(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    [d] = download_chunk(["k"], [f"http://127.0.0.1:{port}/x.jpg"], loopback_options(timeout=1.0), tmp_path / "w")
    assert d.reason == "connection_error" and "robots.txt unavailable" in d.detail


def test_x_robots_tag_is_read_before_the_body(server, tmp_path):
    """The body would take 3 s (past the 2 s deadline): the opt-out comes from the headers at once."""
    started = time.monotonic()
    [d] = download_chunk(["k"], [server.url("/noai-stall.jpg")], loopback_options(timeout=2.0), tmp_path / "w")
    assert d.reason == "opted_out" and time.monotonic() - started < 1.0
    [d] = download_chunk(["k"], [server.url("/noai-stall.jpg")],
                         loopback_options(timeout=1.0, disallowed_header_directives=[], respect_robots_txt=False),
                         tmp_path / "w")
    assert d.reason == "timeout"  # --ignore-robots: the body is read, and stalls


# ----------------------------------------------------------------------------------------------- placeholders
def test_a_redirect_to_flickrs_photo_unavailable_fails_placeholder_for_flickr_sources(server, tmp_path):
    urls = [server.url("/gone/1.jpg"), server.url("/img/2.jpg")]
    got = list(download_chunk(["a", "b"], urls, loopback_options(timeout=2.0), tmp_path / "w", source="sbu_captions"))
    assert [d.reason for d in got] == [placeholders.PLACEHOLDER, None]
    assert got[0].detail.endswith("/pw/images/en-us/photo_unavailable.png")
    assert server.requests("/pw/") == []  # the Location decided: the placeholder itself was never requested
    # A source without Flickr URLs has no such rule: the PNG is an image like any other.
    [d] = download_chunk(["a"], urls[:1], loopback_options(timeout=2.0), tmp_path / "w", source="wit")
    assert d.reason is None and d.data == grey_png()


def test_known_placeholder_digests_and_the_catalogs_rules():
    png = grey_png()
    known = placeholders.Placeholders(digests=frozenset({hashlib.sha256(png).hexdigest()}))
    assert known.body(png).startswith("known placeholder image sha256 ")
    assert known.body(jpeg(1, 8, 8)) is None
    flickr = placeholders.for_source("yfcc100m")
    assert flickr.redirect("https://s.yimg.com/pw/images/en-us/photo_unavailable_l.png")
    assert flickr.redirect("http://l.yimg.com/g/images/photo_unavailable.gif")
    assert flickr.redirect("https://live.staticflickr.com/65535/1_2.jpg") is None
    assert placeholders.for_source("coco") == placeholders.Placeholders()


def test_the_generic_rule_marks_every_row_of_a_digest_served_for_many_urls():
    rows = ([("a", f"http://h/{i}") for i in range(25)] + [("a", "http://h/0")] * 3  # 25 distinct URLs, 28 rows
            + [("b", f"http://h/b{i}") for i in range(19)]  # one short of 20
            + [("a", None), ("c", None)])  # an archive member with digest a shares its fate
    meta = pl.DataFrame({schema.IMAGE_SHA256: [r[0] for r in rows], schema.IMAGE_URL: [r[1] for r in rows]})
    marked = placeholders.mark(meta, 20)
    flags = marked.get_column(placeholders.PLACEHOLDER).to_list()
    assert flags == [True] * 28 + [False] * 19 + [True, False]
    assert marked.get_column(placeholders.PLACEHOLDER_URLS).to_list()[:1] == [25]
    assert not any(placeholders.mark(meta, 0).get_column(placeholders.PLACEHOLDER).to_list())
    assert sum(placeholders.mark(meta, 19).get_column(placeholders.PLACEHOLDER).to_list()) == 28 + 19 + 1


# ------------------------------------------------------------------------------------------------- redirects
@pytest.fixture
def two_servers():
    """A redirects to B: two loopback servers (two ports: two origins, two budget keys), each with its own log."""
    a = PoliteServer(image_size=(16, 16)).start()
    b = PoliteServer(image_size=(16, 16), robots_txt=ROBOTS, robots_status=200, hold_s=0.1).start()
    yield a, b
    a.stop()
    b.stop()


def test_a_redirect_target_is_checked_against_its_own_origins_robots_txt(two_servers, tmp_path):
    a, b = two_servers
    a.redirects.update({"/to-private/1.jpg": b.url("/private/1.jpg"), "/to-public/2.jpg": b.url("/img/2.jpg"),
                        "/to-private/3.jpg": b.url("/private/3.jpg")})
    paths = ["/to-private/1.jpg", "/to-public/2.jpg", "/to-private/3.jpg"]
    got = list(download_chunk(paths, [a.url(p) for p in paths], loopback_options(timeout=2.0, thread_count=4),
                              tmp_path / "w", state_dir=tmp_path))
    assert [d.reason for d in got] == [robots.ROBOTS_DISALLOWED, None, robots.ROBOTS_DISALLOWED]
    assert got[0].detail == f"disallowed by {robots.origin(b.url('/'))}/robots.txt for pmd"
    assert got[1].data == jpeg(2, 16, 16)
    # B was asked for its robots.txt once and for the allowed image; never for a disallowed path.
    assert sorted(r[0] for r in b.log) == ["/img/2.jpg", "/robots.txt"]
    assert sorted(r[0] for r in a.log) == ["/robots.txt", *sorted(paths)]
    # --ignore-robots: the target is asked for (and answers 404).
    [d] = download_chunk(["k"], [a.url("/to-private/1.jpg")], loopback_options(respect_robots_txt=False),
                         tmp_path / "w")
    assert d.reason == "http_404" and len(b.requests("/private/1.jpg")) == 1


def test_a_redirect_to_a_known_placeholder_is_never_requested(two_servers, tmp_path):
    a, b = two_servers
    a.redirects["/to-gone/1.jpg"] = b.url("/pw/images/en-us/photo_unavailable.png")
    urls = [a.url("/to-gone/1.jpg"), a.url("/gone/2.jpg")]  # to another server; a relative Location on A itself
    got = list(download_chunk(["a", "b"], urls, loopback_options(timeout=2.0), tmp_path / "w", source="sbu_captions"))
    assert [d.reason for d in got] == [placeholders.PLACEHOLDER] * 2
    assert got[0].detail.endswith(b.url("/pw/images/en-us/photo_unavailable.png"))
    assert b.log == [] and a.requests("/pw/") == []  # not even B's robots.txt: the Location alone decided


def test_a_redirect_chain_longer_than_the_limit_fails_redirect_error(server, tmp_path):
    from pmd.http_client import _MAX_REDIRECTS

    assert _MAX_REDIRECTS == 10
    urls = [server.url("/chain/9/1.jpg"), server.url("/chain/10/2.jpg")]  # 10 redirects; 11
    got = list(download_chunk(["ok", "long"], urls, loopback_options(timeout=2.0), tmp_path / "w"))
    assert got[0].reason is None and got[0].data == jpeg(1, 16, 16)  # relative `../N-1/1.jpg` Locations resolved
    assert got[1].reason == "redirect_error" and "too many redirects" in got[1].detail
    assert len([r for r in server.log if r[0].endswith("/1.jpg")]) == 11  # 10 redirects + the image
    assert len([r for r in server.log if r[0].endswith("/2.jpg")]) == 11  # 11 redirects, the image never asked
    assert server.requests("/img/2.jpg") == []


def test_a_redirect_hop_counts_in_its_targets_host_budget(two_servers, tmp_path):
    """max_per_host 1, two downloads at once as two processes would be (two user-agent tokens: two clients, two
    connection pools, one budget): B's own URLs in one, redirects from A to B in the other. B never has more than
    one request in flight: each hop holds a lease of B's budget, not of A's."""
    a, b = two_servers
    b.robots_status = 404
    for i in range(6):
        a.redirects[f"/a/{i}.jpg"] = b.url(f"/hold/{i}.jpg")
    jobs = {"pmd": [a.url(f"/a/{i}.jpg") for i in range(6)], "pmd-other": [b.url(f"/hold/{10 + i}.jpg")
                                                                           for i in range(6)]}
    results: dict[str, list] = {}

    def run(token: str) -> None:
        urls = jobs[token]
        opts = loopback_options(timeout=5.0, thread_count=4, max_per_host=1, user_agent_token=token)
        results[token] = list(download_chunk(urls, urls, opts, tmp_path / token))

    threads = [threading.Thread(target=run, args=(t,)) for t in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [d.reason for t in jobs for d in results[t]] == [None] * 12
    assert len(b.requests("/hold/")) == 12 and b.peak_in_flight == 1


def test_a_429_on_a_redirect_hop_pauses_the_target_host(two_servers, tmp_path):
    a, b = two_servers
    b.robots_status = 404
    a.redirects["/to-429/1.jpg"] = b.url("/once429/1/1.jpg")
    opts = loopback_options(timeout=2.0, retries=0)
    [d] = download_chunk(["k"], [a.url("/to-429/1.jpg")], opts, tmp_path / "w")
    assert d.reason == "http_429"
    # This process's own backoff is the target's too: B paused, A (which answered a redirect) not.
    from pmd.download_http import gate_for, host_key

    gate = gate_for(opts.max_per_host)
    with gate.cond:
        now = time.monotonic()
        assert gate.hosts[host_key(b.url("/"))].paused_until > now
        assert host_key(a.url("/")) not in gate.hosts or gate.hosts[host_key(a.url("/"))].paused_until <= now
    # B's budget is paused for the Retry-After second: B's next request waits for it (A's host was not the one).
    [d] = download_chunk(["k"], [b.url("/img/2.jpg")], opts, tmp_path / "w")
    assert d.reason is None
    [(_, arrived, _)] = b.requests("/img/2.jpg")
    assert arrived - b.refused_at >= 0.9


def test_a_redirect_keeps_the_connections_alive(two_servers):
    """Each hop's connection goes back to its pool read to the end: 20 redirected fetches, one connection each."""
    from pmd.http_client import HttpClient
    from tests.loopback import loopback_guard

    a, b = two_servers
    for i in range(20):
        a.redirects[f"/k/{i}.jpg"] = b.url(f"/img/{i}.jpg")
    client = HttpClient(max_per_host=2, guard=loopback_guard())
    for i in range(20):
        fetched = client.fetch(a.url(f"/k/{i}.jpg"), 2.0, 1 << 20, [])
        assert fetched.data == jpeg(i, 16, 16) and fetched.answered_by == b.url(f"/img/{i}.jpg")
    assert a.connections == 1 and b.connections == 1
    assert client.fetch(b.url("/img/0.jpg"), 2.0, 1 << 20, []).answered_by is None  # not redirected
    # A chunked redirect body is read to its end: the same connection serves the hop and the next fetches.
    for i in range(5):
        assert client.fetch(b.url(f"/moved-chunked/{i}.jpg"), 2.0, 1 << 20, []).data == jpeg(i, 16, 16)
    assert b.connections == 1
    # A body that only the server's close ends is not waited for: that connection is closed, the hop opens another.
    for i in range(3):
        assert client.fetch(b.url(f"/moved-close/{i}.jpg"), 2.0, 1 << 20, []).data == jpeg(i, 16, 16)
    assert b.connections == 4


# ------------------------------------------------------------------------------------------ flags and catalog
def test_the_politeness_flags_reach_the_build_config(tmp_path):
    from pmd_cli.pmd import _build_config, build_parser

    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("http://127.0.0.1/x.jpg\ta caption\n")
    base = ["build", "conceptual_12m", str(tsv), "--out", str(tmp_path / "out")]
    d = _build_config(build_parser().parse_args(base)).download
    assert (d.max_per_host, d.max_rate_per_host, d.respect_robots_txt, d.placeholder_min_urls) == (16, 0.0, True, 20)
    assert d.disallowed_header_directives
    d = _build_config(build_parser().parse_args(
        [*base, "--max-per-host", "4", "--max-rate-per-host", "2.5", "--ignore-robots",
         "--placeholder-min-urls", "0"])).download
    assert (d.max_per_host, d.max_rate_per_host, d.respect_robots_txt, d.placeholder_min_urls) == (4, 2.5, False, 0)
    assert d.disallowed_header_directives == []
    assert "budget_address" not in d.to_dict()
    for bad in ({"max_rate_per_host": -1.0}, {"max_rate_per_host": float("inf")}, {"placeholder_min_urls": 1}):
        with pytest.raises(ValueError):
            DownloadOptions(**bad)


def test_catalog_tables_are_checked(monkeypatch):
    from pmd import catalog

    raw = dict(catalog._raw_catalog())
    monkeypatch.setattr(catalog, "_raw_catalog", lambda: {**raw, "host_group": [
        {"name": "a", "domains": ["x.com"]}, {"name": "b", "domains": ["X.com"]}]})
    catalog.host_groups.cache_clear()
    with pytest.raises(catalog.CatalogError, match="in both 'a' and 'b'"):
        catalog.host_groups()
    monkeypatch.setattr(catalog, "_raw_catalog", lambda: {**raw, "placeholder": [
        {"sources": ["sbu_captions"], "what": "w", "sha256": ["ABC"]}]})
    catalog.placeholder_rules.cache_clear()
    with pytest.raises(catalog.CatalogError, match="not a lowercase hex sha256"):
        catalog.placeholder_rules()
    monkeypatch.undo()
    catalog.host_groups.cache_clear()
    catalog.placeholder_rules.cache_clear()
    assert [g.name for g in catalog.host_groups()][0] == "flickr"
