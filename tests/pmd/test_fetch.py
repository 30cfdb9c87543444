"""`pmd fetch-metadata` against a loopback server standing in for the hosts: cut transfers resume byte-identical."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pmd_cli.pmd import main as pmd_main
from pmd.fetch import FetchError, fetch, plan

WIT_NAMES = [f"wit_v1.train.all-0000{i}-of-00010.tsv.gz" for i in range(10)]


def body(path: str) -> bytes:
    """Deterministic bytes per path (~100-200 KB), so every file differs."""
    seed = hashlib.sha256(path.encode()).digest()
    n = 100_000 + seed[0] * 400
    out = bytearray()
    block = seed
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        data = body(self.path)
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((self.path, rng))
            cut = srv.cut_first and self.path not in srv.seen
            srv.seen.add(self.path)
        start = int(rng.split("=")[1].split("-")[0]) if rng and srv.ranges else 0
        if start >= len(data) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if rng and srv.ranges else 200)
        if rng and srv.ranges:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if cut:  # half the body, then the connection drops
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])


class Hosts(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cut_first=False, ranges=True):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str | None]] = []
        self.seen: set[str] = set()
        self.cut_first, self.ranges = cut_first, ranges

    @property
    def mirror(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def hosts(request):
    srv = Hosts(**getattr(request, "param", {}))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def expected(name: str, url: str) -> bytes:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return body(f"/{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else ""))


def test_plan_expands_ranges_and_names_manual_steps():
    p = plan(["wit", "conceptual_12m", "red_caps"])
    assert [f.name for f in p.files] == WIT_NAMES + ["cc12m.tsv", "redcaps_v1.0_annotations.zip"]
    assert p.manual == []
    everything = plan()
    names = [f.name for f in everything.files]
    assert len(names) == len(set(names)) and "caption_datasets.zip" not in names  # gated: a step, not a file
    assert "flickr30k_test_captions.jsonl" in names  # public metadata of a manual-images source is fetched
    assert [m.sources[0] for m in everything.manual] == ["coco", "localized_narratives__flickr30k",
                                                         "conceptual_captions", "yfcc100m"]
    with pytest.raises(FetchError, match="unknown sources"):
        plan(["coco", "laion"])


@pytest.mark.parametrize("hosts", [{"cut_first": True}], indirect=True)
def test_cut_downloads_resume_within_the_run(hosts, tmp_path, capsys):
    to = tmp_path / "meta"
    assert pmd_main(["fetch-metadata", "wit", "conceptual_12m", "--to", str(to), "--mirror", hosts.mirror,
                     "-q"]) == 0
    record = json.loads((to / "fetched.json").read_text())
    assert sorted(record["files"]) == sorted(WIT_NAMES + ["cc12m.tsv"])
    for name, info in record["files"].items():
        data = (to / name).read_bytes()
        assert data == expected(name, info["url"])
        assert info["bytes"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
    # every file was cut once, then resumed with a range request from where it stopped
    resumed = [r for _, r in hosts.requests if r]
    assert len(resumed) == 11 and all(r.startswith("bytes=") and r != "bytes=0-" for r in resumed)
    assert not list(to.glob("*.part"))
    # a rerun asks nothing of the hosts
    before = len(hosts.requests)
    summary = fetch(to, ["wit", "conceptual_12m"], mirror=hosts.mirror, progress=False)
    assert len(hosts.requests) == before and len(summary["skipped"]) == 11 and summary["fetched"] == []


@pytest.mark.parametrize("hosts", [{"cut_first": True}], indirect=True)
def test_a_failed_run_resumes_in_the_next(hosts, tmp_path, capsys):
    to = tmp_path / "meta"
    assert pmd_main(["fetch-metadata", "conceptual_12m", "--to", str(to), "--mirror", hosts.mirror, "--attempts",
                     "1", "-q"]) == 1
    assert "rerun to resume" in capsys.readouterr().err
    part = to / "cc12m.tsv.part"
    half = part.stat().st_size
    assert 0 < half < len(expected("cc12m.tsv", "https://storage.googleapis.com/conceptual_12m/cc12m.tsv"))
    assert pmd_main(["fetch-metadata", "conceptual_12m", "--to", str(to), "--mirror", hosts.mirror, "-q"]) == 0
    assert hosts.requests[-1][1] == f"bytes={half}-"
    assert (to / "cc12m.tsv").read_bytes() == expected("cc12m.tsv",
                                                       "https://storage.googleapis.com/conceptual_12m/cc12m.tsv")


@pytest.mark.parametrize("hosts", [{"cut_first": True, "ranges": False}], indirect=True)
def test_a_server_without_ranges_sends_the_whole_file_again(hosts, tmp_path):
    to = tmp_path / "meta"
    summary = fetch(to, ["conceptual_12m"], mirror=hosts.mirror, progress=False)
    assert summary["fetched"] == ["cc12m.tsv"]
    assert (to / "cc12m.tsv").read_bytes() == expected("cc12m.tsv",
                                                       "https://storage.googleapis.com/conceptual_12m/cc12m.tsv")


def test_gated_sources_print_their_manual_step(hosts, tmp_path, capsys):
    to = tmp_path / "meta"
    assert pmd_main(["fetch-metadata", "coco", "conceptual_captions", "--to", str(to), "--mirror", hosts.mirror,
                     "-q"]) == 0
    out = capsys.readouterr().out
    assert "accept the terms at https://huggingface.co/datasets/facebook/pmd" in out
    assert "Conceptual Captions 3M" in out
    assert hosts.requests == []  # nothing gated is attempted
    assert [m["sources"][0] for m in json.loads((to / "fetched.json").read_text())["manual"]] == [
        "coco", "conceptual_captions"]
