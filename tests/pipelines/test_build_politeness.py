"""Politeness of a whole build (issue 25): host budgets across download processes, robots.txt, placeholders.

One loopback host (tests/politeserver.py logs every request on its own clock); two download processes (the pool
with 2 workers, and local Ray).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from pipelines import build
from pipelines.build import run_build
from pmd import placeholders, robots, stats
from tests.pipelines.build_fixtures import url_build_config
from tests.politeserver import PoliteServer

ROBOTS = "User-agent: *\nDisallow: /private/\n"


def _sbu(path: Path, urls: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"image_urls": urls, "user_ids": ["u"] * len(urls),
                                "captions": [f"a photo of thing number {i} in the park" for i in range(len(urls))]}))
    return path


@pytest.fixture
def server():
    srv = PoliteServer(image_size=(32, 32), hold_s=0.05, robots_txt=ROBOTS, robots_status=200).start()
    yield srv
    srv.stop()


def _mixed(server: PoliteServer) -> list[str]:
    return ([server.url(f"/hold/{100 + i}.jpg") for i in range(100)]
            + [server.url(f"/private/{i}.jpg") for i in range(10)]
            + [server.url("/gone/1.jpg")]
            + [server.url(f"/same/{i}.jpg") for i in range(25)])


def _check_mixed_build(server: PoliteServer, out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    acc = manifest["accounting"]["sbu_captions"]
    assert acc["pairs"] == 100
    assert acc["failures_by_reason"] == {robots.ROBOTS_DISALLOWED: 10, placeholders.PLACEHOLDER: 26}
    assert acc["input_rows"] == acc["pairs"] + acc["rejects"] + acc["failures"]
    # The bound holds across both processes, and is reached (the build was not simply too slow to exceed it).
    assert server.peak_in_flight == 4
    assert server.requests("/private/") == []
    assert 1 <= len(server.requests("/robots.txt")) <= 2  # at most once per download process
    assert len(server.requests("/same/")) == 25  # downloaded, then failed in the final phase
    found = stats.audit(out)["placeholders"]
    assert [(p["rule"], p["rows"], p["urls"]) for p in found] == [("many_urls", 25, 25), ("redirect", 1, 1)]
    assert found[0]["sample_urls"] == sorted(server.url(f"/same/{i}.jpg") for i in range(25))[:5]
    assert found[0]["sha256"] and found[1]["redirect"] == "/pw/images/en-us/photo_unavailable.png"


@pytest.mark.slow
def test_pool_two_processes_share_max_per_host_and_robots_and_placeholders(tmp_path, server):
    sbu = _sbu(tmp_path / "in" / "sbu-captions-all.json", _mixed(server))
    config = url_build_config("sbu_captions", [sbu], tmp_path / "out", executor="pool", num_cpus=2, chunk_rows=34,
                              **{"download.max_per_host": 4, "download.thread_count": 16, "download.timeout": 5.0})
    run_build(config)
    _check_mixed_build(server, tmp_path / "out")
    assert list((tmp_path / "out" / "work" / robots.ROBOTS_DIR).glob("*.json"))  # beside the work state


@pytest.mark.slow
def test_ray_two_processes_share_max_per_host_and_robots_and_placeholders(tmp_path, server, ray_local):
    sbu = _sbu(tmp_path / "in" / "sbu-captions-all.json", _mixed(server))
    config = url_build_config("sbu_captions", [sbu], tmp_path / "out", executor="ray", chunk_rows=34,
                              **{"download.max_per_host": 4, "download.thread_count": 16, "download.timeout": 5.0})
    run_build(config)
    _check_mixed_build(server, tmp_path / "out")


@pytest.mark.slow
def test_without_the_build_budget_two_processes_exceed_a_per_process_bound(tmp_path, server, monkeypatch):
    """The control of the tests above: the same pool build with each process on its own budget sees more than 4
    requests in flight, so `peak_in_flight == 4` there is the build's budget at work."""
    monkeypatch.setattr(build, "budget_service", contextlib.contextmanager(lambda config: (yield config)))
    sbu = _sbu(tmp_path / "in" / "sbu-captions-all.json", [server.url(f"/hold/{i}.jpg") for i in range(80)])
    config = url_build_config("sbu_captions", [sbu], tmp_path / "out", executor="pool", num_cpus=2, chunk_rows=40,
                              **{"download.max_per_host": 4, "download.thread_count": 16, "download.timeout": 5.0})
    run_build(config)
    assert 4 < server.peak_in_flight <= 8


@pytest.mark.slow
def test_a_rate_cap_holds_on_the_servers_clock(tmp_path, server):
    sbu = _sbu(tmp_path / "in" / "sbu-captions-all.json", [server.url(f"/img/{i}.jpg") for i in range(40)])
    config = url_build_config("sbu_captions", [sbu], tmp_path / "out", executor="pool", num_cpus=2, chunk_rows=20,
                              **{"download.max_rate_per_host": 20.0, "download.thread_count": 16})
    run_build(config)
    arrivals = sorted(t for _, t, _ in server.requests("/"))
    assert len(server.requests("/img/")) == 40
    # robots.txt at most once per download process: the pool's two processes may ask for it at the same moment
    # (each request, robots.txt included, holds a grant of the host's rate).
    assert 1 <= len(server.requests("/robots.txt")) <= 2
    assert len(arrivals) == 40 + len(server.requests("/robots.txt"))
    # Grants are spaced 50 ms apart at the budget server; the HTTP server sees them within its own jitter (a
    # request delayed on its way lets the next one land closer: a window may hold one or two more). Uncapped,
    # the 41 requests arrive within ~0.1 s.
    span = arrivals[-1] - arrivals[0]
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    assert span >= (len(arrivals) - 1) / 20.0 * 0.95, span
    assert 0.045 <= gaps[len(gaps) // 2] <= 0.08, gaps
    assert max(len([t for t in arrivals if a <= t < a + 1.0]) for a in arrivals) <= 20 + 2


@pytest.mark.slow
def test_a_429_with_retry_after_pauses_the_host_for_every_process(tmp_path, server):
    """The host's first answer is a 429 with Retry-After: 2 (to one task of two running at once): no request of
    any task reaches the host in the next 2 s; both tasks' URLs are fetched after it, the refused one retried."""
    urls = [server.url(f"/once429/2/{i}.jpg") for i in range(60)]
    sbu = _sbu(tmp_path / "in" / "sbu-captions-all.json", urls)
    config = url_build_config("sbu_captions", [sbu], tmp_path / "out", executor="pool", num_cpus=2, chunk_rows=30,
                              **{"download.max_per_host": 4, "download.thread_count": 8, "download.retries": 1})
    run_build(config)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["accounting"]["sbu_captions"]["pairs"] == 60
    refused = server.refused_at
    assert refused is not None
    log = server.requests("/once429/")
    during = [p for p, t, _ in log if refused + 0.1 < t < refused + 1.9]
    assert during == [], during
    after = {p for p, t, _ in log if t >= refused + 1.9}
    assert {int(p.rsplit("/", 1)[1].split(".")[0]) < 30 for p in after} == {True, False}  # both halves
