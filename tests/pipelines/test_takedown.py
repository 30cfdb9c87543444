"""`pmd takedown`: removal requests applied to a real build; verify passes, idempotent, safe at any kill point."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pmd import atomic, schema
from pmd_cli.pmd import main as pmd_main
from pmd.shards import verify
from pmd.stats import locate_build
from pmd.takedown import TakedownError, apply, read_request
from tests.pipelines.build_fixtures import make_coco

PMD = str(Path(sys.executable).with_name("pmd"))


@pytest.fixture(scope="module")
def coco_inputs(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("takedown") / "in", n_images=16)


def build(coco, out: Path, *extra: str) -> None:
    cmd = [PMD, "build", "coco", str(coco.karpathy), *sum((["--images", str(z)] for z in coco.zips), []),
           "--out", str(out), "--executor", "local", "--shard-rows", "20", "--row-group-rows", "6",
           "--image-size", "32", "-q", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def built(coco_inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("takedown") / "out"
    build(coco_inputs, out)
    return out


@pytest.fixture
def corpus(built, tmp_path) -> Path:
    out = tmp_path / "corpus"
    shutil.copytree(built, out)
    return out


def rows(out: Path) -> list[dict]:
    m = json.loads((out / "manifest.json").read_text())
    return [r for s in m["shards"] for r in pq.read_table(out / s["file"], columns=[
        schema.KEY, schema.IMAGE_SHA256, schema.IMAGE_URL]).to_pylist()]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of the corpus, with the takedown timestamps taken out of the manifest, the request record and the
    card (README.md's takedown table repeats `applied_at`: two runs a second apart differ there and nowhere else)."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and "work" not in p.relative_to(out).parts:
            data = p.read_bytes()
            if p.suffix == ".json":
                d = json.loads(data)
                for t in d.get("takedowns", []):
                    t.pop("applied_at", None)
                d.pop("received_at", None)
                data = json.dumps(d, sort_keys=True).encode()
            elif p.name == "README.md":
                data = re.sub(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", b"<time>", data)
            files[str(p.relative_to(out))] = data
    return files


def write_list(path: Path, values: list[str]) -> Path:
    path.write_text("# removal request\n" + "\n".join(values) + "\n\n")
    return path


def apply_killed_after(renames: int, corpus: Path, victims_file: Path, monkeypatch) -> list:
    """`pmd takedown` as a process killed right after its N-th atomic rename; returns the renamed paths."""
    real_replace, calls = atomic.os.replace, []

    def dying_replace(src, dst):
        if len(calls) == renames:
            raise KeyboardInterrupt("killed")
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        apply(corpus, read_request("keys", victims_file))
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    return calls


def test_keys_removed_only_affected_shards_rewritten_and_verify_passes(corpus, tmp_path):
    before_rows = rows(corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    first_shard = pq.read_table(corpus / manifest["shards"][0]["file"], columns=[schema.KEY]).column(0).to_pylist()
    victims = [first_shard[1], first_shard[7]]  # two rows of the first shard, in different row groups
    before = snapshot(corpus)
    groups_before = [g.num_rows for g in (pq.ParquetFile(corpus / manifest["shards"][0]["file"]).metadata
                                          .row_group(i) for i in range(pq.ParquetFile(
                                              corpus / manifest["shards"][0]["file"]).num_row_groups))]

    assert pmd_main(["takedown", str(corpus), "--keys", str(write_list(tmp_path / "k.txt", victims)),
                     "--reason", "owner request 42"]) == 0
    assert verify(corpus) == []
    after_rows = rows(corpus)
    assert after_rows == [r for r in before_rows if r[schema.KEY] not in victims]  # same order for the rest
    after = snapshot(corpus)
    changed = {f for f in before if before[f] != after.get(f)}
    # the card and croissant.json list the rewritten shard's digest (pmd.card)
    assert changed == {"manifest.json", "README.md", "croissant.json", manifest["shards"][0]["file"]}
    parquet = pq.ParquetFile(corpus / manifest["shards"][0]["file"])
    groups_after = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert groups_after == [groups_before[0] - 1, groups_before[1] - 1, *groups_before[2:]]

    new = json.loads((corpus / "manifest.json").read_text())
    acc, old_acc = new["accounting"]["coco"], manifest["accounting"]["coco"]
    assert (acc["pairs"], acc["failures"]) == (old_acc["pairs"] - 2, old_acc["failures"] + 2)
    assert acc["failures_by_reason"]["takedown"] == 2 and new["totals"]["pairs"] == old_acc["pairs"] - 2
    [request] = new["takedowns"]
    assert request["rows"] == 2 and request["kind"] == "keys" and request["reason"] == "owner request 42"
    assert len(request["list_sha256"]) == 64
    failures = pq.read_table(corpus / request["failures_file"]).to_pylist()
    assert [f[schema.KEY] for f in failures] == victims
    assert {(f["stage"], f["reason"]) for f in failures} == {("takedown", "takedown")}
    assert all("owner request 42" in f["detail"] for f in failures)

    # The same request again changes nothing at all.
    assert pmd_main(["takedown", str(corpus), "--keys", str(tmp_path / "k.txt")]) == 0
    assert snapshot(corpus) == after


def test_an_image_digest_removes_every_pair_of_that_image(corpus, tmp_path):
    before = rows(corpus)
    counts = {}
    for r in before:
        counts[r[schema.IMAGE_SHA256]] = counts.get(r[schema.IMAGE_SHA256], 0) + 1
    digest = max(counts, key=counts.get)  # an image with all its five captions
    manifest = json.loads((corpus / "manifest.json").read_text())
    result = apply(corpus, read_request("image_sha256", write_list(tmp_path / "s.txt", [digest.upper()])))
    assert result["rows"] == counts[digest] == 5
    assert verify(corpus) == []
    assert all(r[schema.IMAGE_SHA256] != digest for r in rows(corpus))
    new = json.loads((corpus / "manifest.json").read_text())
    assert new["accounting"]["coco"]["unique_images"] == manifest["accounting"]["coco"]["unique_images"] - 1
    assert new["totals"]["unique_images"] == manifest["totals"]["unique_images"] - 1


@pytest.mark.parametrize("crash_after", range(0, 8))  # every rename, the manifest last
def test_killed_at_any_point_the_rerun_gives_the_uninterrupted_result(built, tmp_path, monkeypatch, crash_after):
    victims_file = tmp_path / "k.txt"
    keys = [r[schema.KEY] for r in rows(built)]
    write_list(victims_file, [keys[0], keys[25], keys[-1]])  # three shards touched
    reference = tmp_path / "reference"
    shutil.copytree(built, reference)
    apply(reference, read_request("keys", victims_file))

    corpus = tmp_path / "killed"
    shutil.copytree(built, corpus)
    apply_killed_after(crash_after, corpus, victims_file, monkeypatch)
    apply(corpus, read_request("keys", victims_file))
    assert snapshot(corpus) == snapshot(reference)
    assert verify(corpus) == []
    assert not list((corpus / "takedowns").glob("*.pending.parquet"))


def test_bad_lists_are_clear_errors(corpus, tmp_path, capsys):
    bad = write_list(tmp_path / "bad.txt", ["ab" * 32, "not-a-digest"])
    with pytest.raises(TakedownError, match=r"bad.txt:3: 'not-a-digest' is not a hex sha256"):
        read_request("image_sha256", bad)
    with pytest.raises(TakedownError, match="names nothing"):
        read_request("keys", write_list(tmp_path / "empty.txt", []))
    with pytest.raises(TakedownError, match="not an http"):
        read_request("urls", write_list(tmp_path / "u.txt", ["ftp://x/y.jpg"]))
    assert pmd_main(["takedown", str(corpus), "--image-sha256", str(bad)]) == 2
    assert "not a hex sha256" in capsys.readouterr().err
    assert pmd_main(["takedown", str(tmp_path / "nowhere"), "--keys", str(write_list(tmp_path / "k", ["x"]))]) == 2


def test_killed_after_the_manifest_the_rerun_only_drops_the_journal(built, tmp_path, monkeypatch):
    victims_file = write_list(tmp_path / "k.txt", [rows(built)[3][schema.KEY]])
    corpus = tmp_path / "killed"
    shutil.copytree(built, corpus)
    real_unlink = Path.unlink

    def dying_unlink(self, missing_ok=False):
        if self.name.endswith(".pending.parquet"):
            raise KeyboardInterrupt("killed")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with pytest.raises(KeyboardInterrupt):
        apply(corpus, read_request("keys", victims_file))
    monkeypatch.setattr(Path, "unlink", real_unlink)
    done = snapshot(corpus)
    assert list((corpus / "takedowns").glob("*.pending.parquet"))
    assert apply(corpus, read_request("keys", victims_file))["applied"] is False
    assert not list((corpus / "takedowns").glob("*.pending.parquet"))
    assert {k: v for k, v in snapshot(corpus).items() if "pending" not in k} == \
        {k: v for k, v in done.items() if "pending" not in k}
    assert verify(corpus) == []


def all_keys(out: Path) -> list[str]:
    return [r[schema.KEY] for r in rows(out)]


def failures(out: Path) -> list[dict]:
    m = json.loads((out / "manifest.json").read_text())
    return [r for f in m["failures"] for r in pq.read_table(out / f["file"]).to_pylist()]


def test_retry_after_takedowns_never_brings_a_pair_back(coco_inputs, built, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(built, corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    shard0 = pq.read_table(corpus / manifest["shards"][0]["file"], columns=[schema.KEY]).column(0).to_pylist()
    by_key = {r[schema.KEY]: r for r in rows(corpus)}
    victims = [shard0[1], shard0[7]]
    texts = {r[schema.KEY]: r[schema.TEXT] for s in manifest["shards"]
             for r in pq.read_table(corpus / s["file"], columns=[schema.KEY, schema.TEXT]).to_pylist()}
    digest = next(r[schema.IMAGE_SHA256] for r in rows(corpus)[30:] if r[schema.KEY] not in victims)
    image_rows = sorted(k for k, r in by_key.items() if r[schema.IMAGE_SHA256] == digest)
    assert pmd_main(["takedown", str(corpus), "--keys", str(write_list(tmp_path / "k.txt", victims)),
                     "--reason", "owner request 42"]) == 0
    assert pmd_main(["takedown", str(corpus), "--image-sha256", str(write_list(tmp_path / "s.txt", [digest]))]) == 0
    gone = set(victims) | set(image_rows)
    assert len(gone) == 2 + 5
    assert len(list((corpus / "takedowns").glob("*.removed.parquet"))) == 2
    removed = [r for p in sorted((corpus / "takedowns").glob("*.removed.parquet"))
               for r in pq.read_table(p).to_pylist()]
    assert sorted(r[schema.KEY] for r in removed) == sorted(gone)
    assert "image" not in removed[0] and all(r[schema.TEXT] == texts[r[schema.KEY]] for r in removed)
    assert locate_build(corpus).problems == []  # the takedown records are not taken for shards

    build(coco_inputs, corpus, "--retry-failures")
    assert verify(corpus) == []
    keys = all_keys(corpus)
    assert not gone & set(keys)
    assert sorted(keys) == sorted(set(by_key) - gone)
    after = json.loads((corpus / "manifest.json").read_text())
    acc, old = after["accounting"]["coco"], manifest["accounting"]["coco"]
    assert acc["input_rows"] == acc["pairs"] + acc["rejects"] + acc["failures"]
    assert acc["pairs"] == old["pairs"] - 7 and acc["failures_by_reason"]["takedown"] == 7
    assert acc["unique_images"] == old["unique_images"] - 1
    assert after["totals"]["failures_by_reason"]["takedown"] == 7
    assert {f["file"] for f in after["failures"]} == {"failures/coco.parquet"}
    assert not list((corpus / "failures").glob("takedown-*"))
    taken = [f for f in failures(corpus) if f["reason"] == "takedown"]
    assert sorted(f[schema.KEY] for f in taken) == sorted(gone)
    assert {f["stage"] for f in taken} == {"takedown"}
    assert all("owner request 42" in f["detail"] for f in taken if f[schema.KEY] in victims)
    listed = {t["kind"]: t for t in after["takedowns"]}
    assert sorted(listed) == ["image_sha256", "keys"]
    assert (listed["keys"]["rows"], listed["image_sha256"]["rows"]) == (2, 5)
    assert listed["keys"]["reason"] == "owner request 42" and listed["keys"]["rows_by_source"] == {"coco": 2}
    # The corpus is the one a build whose first attempt already excluded these rows would write: rebuilt from
    # scratch over the same OUT (recorded requests, no work directory), the shards are identical.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copytree(corpus / "takedowns", fresh / "takedowns")
    build(coco_inputs, fresh)
    assert verify(fresh) == []
    assert [pq.read_table(fresh / s["file"]) for s in json.loads((fresh / "manifest.json").read_text())["shards"]] \
        == [pq.read_table(corpus / s["file"]) for s in after["shards"]]

    # Applied again, after the retry: nothing changes; a second retry changes nothing either.
    before = snapshot(corpus)
    assert apply(corpus, read_request("keys", tmp_path / "k.txt"))["applied"] is False
    assert apply(corpus, read_request("image_sha256", tmp_path / "s.txt"))["applied"] is False
    assert snapshot(corpus) == before
    build(coco_inputs, corpus, "--retry-failures")
    assert verify(corpus) == [] and sorted(all_keys(corpus)) == sorted(keys)
    dated = ("manifest.json", "README.md", "croissant.json")  # they carry the build's date
    assert {k: v for k, v in snapshot(corpus).items() if k not in dated} == \
        {k: v for k, v in before.items() if k not in dated}


def test_a_plain_rebuild_applies_a_takedown_made_after_the_build(coco_inputs, built, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(built, corpus)
    victims = all_keys(corpus)[::9]
    assert pmd_main(["takedown", str(corpus), "--keys", str(write_list(tmp_path / "k.txt", victims))]) == 0
    build(coco_inputs, corpus)  # the same command again, no retry
    assert verify(corpus) == []
    assert not set(victims) & set(all_keys(corpus))
    acc = json.loads((corpus / "manifest.json").read_text())["accounting"]["coco"]
    assert acc["failures_by_reason"]["takedown"] == len(victims)


def test_a_retried_row_comes_back_but_a_pair_taken_down_by_url_does_not(tmp_path):
    """A URL source: a transient failure succeeds on retry, while a URL named by two rows (downloaded once) is
    taken down; a mirror URL of the same image is another pair and stays."""
    from pipelines.build import BuildConfig, SourceSpec, run_build
    from pmd.images import ImageOptions
    from tests.httpserver import LoopbackServer
    from tests.loopback import loopback_options

    server = LoopbackServer(image_size=(64, 48), sleep_s=2.0).start()
    try:
        victim = server.url("/img/950.jpg")
        lines = [f"{server.url(f'/img/{800 + i}.jpg')}\tgood {i}" for i in range(8)]
        lines[2:2] = [f"{victim}\tvictim", f"{server.url('/flaky/1/900.jpg?run=takedown')}\tflaky"]
        lines += [f"{server.url('/img/950.jpg?mirror')}\tmirror", f"{victim}\tvictim again"]
        tsv = tmp_path / "cc12m.tsv"
        tsv.write_text("\n".join(lines) + "\n")

        def config(out: Path, retry: bool) -> BuildConfig:
            return BuildConfig(sources=[SourceSpec("conceptual_12m", [tsv])], out=out, shard_rows=4, chunk_rows=4,
                               seed=3, image=ImageOptions(image_size=32),
                               download=loopback_options(timeout=2.0, thread_count=4), executor="local",
                               progress=False, retry_failures=retry)

        out = tmp_path / "out"
        first = run_build(config(out, retry=False))
        assert first["accounting"]["conceptual_12m"]["failures_by_reason"] == {"http_503": 1}
        texts = {r["text"]: r for r in _shard_rows(out)}
        assert {"victim", "victim again", "mirror"} <= set(texts) and "flaky" not in texts
        assert texts["victim"][schema.IMAGE_SHA256] == texts["mirror"][schema.IMAGE_SHA256]
        assert apply(out, read_request("urls", write_list(tmp_path / "u.txt", [victim])))["rows"] == 2

        retried = run_build(config(out, retry=True))
        assert verify(out) == []
        texts = {r["text"]: r for r in _shard_rows(out)}
        assert "flaky" in texts and "mirror" in texts
        assert not {"victim", "victim again"} & set(texts)
        assert all(r[schema.IMAGE_URL] != victim for r in texts.values())
        acc = retried["accounting"]["conceptual_12m"]
        assert acc["failures_by_reason"] == {"takedown": 2} and acc["pairs"] == len(lines) - 2
        assert acc["input_rows"] == acc["pairs"] + acc["rejects"] + acc["failures"]
        [listed] = retried["takedowns"]
        assert (listed["kind"], listed["rows"]) == ("urls", 2)
        taken = [f for f in failures(out) if f["reason"] == "takedown"]
        assert sorted(f[schema.IMAGE_URL] for f in taken) == [victim, victim]

        # The same as a first build that already knew the request (the flaky URL answers at once now).
        reference = tmp_path / "reference"
        reference.mkdir()
        shutil.copytree(out / "takedowns", reference / "takedowns")
        run_build(config(reference, retry=False))
        assert [p.read_bytes() for p in sorted((out / "shards").glob("*.parquet"))] == \
            [p.read_bytes() for p in sorted((reference / "shards").glob("*.parquet"))]
        assert (out / "failures" / "conceptual_12m.parquet").read_bytes() == \
            (reference / "failures" / "conceptual_12m.parquet").read_bytes()
        assert apply(out, read_request("urls", tmp_path / "u.txt"))["applied"] is False
    finally:
        server.stop()


def _shard_rows(out: Path) -> list[dict]:
    m = json.loads((out / "manifest.json").read_text())
    return [r for s in m["shards"] for r in pq.read_table(out / s["file"], columns=[
        schema.KEY, schema.TEXT, schema.IMAGE_SHA256, schema.IMAGE_URL]).to_pylist()]


def test_the_filter_charges_a_row_to_the_first_request_received(tmp_path):
    import pyarrow as pa

    from pmd.takedown import TakedownRequest, load_filter

    (tmp_path / "takedowns").mkdir()
    later = TakedownRequest("keys", ("k1", "k2"), "a" * 64, "later")
    earlier = TakedownRequest("urls", ("http://x/1.jpg",), "b" * 64)
    for request, at in ((later, "2026-02-01T00:00:00Z"), (earlier, "2026-01-01T00:00:00Z")):
        (tmp_path / "takedowns" / f"{request.id}.json").write_text(json.dumps({**request.to_dict(),
                                                                                "received_at": at}))
    takedowns = load_filter(tmp_path)
    assert [r.id for r in takedowns.requests] == [earlier.id, later.id]
    table = pa.table({schema.KEY: ["k1", "k2", "k3", "k4"],
                      schema.IMAGE_URL: ["http://x/1.jpg", "http://x/2.jpg", None, "http://x/1.jpg"],
                      schema.IMAGE_SHA256: ["0" * 64] * 4})
    assert takedowns.match(table) == [earlier.id, later.id, None, earlier.id]
    assert "later" in takedowns.detail(later.id)
    assert not load_filter(tmp_path / "nowhere")


def test_a_shard_shortened_other_than_by_a_takedown_is_still_refused(coco_inputs, built, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(built, corpus)
    shard = corpus / json.loads((corpus / "manifest.json").read_text())["shards"][0]["file"]
    table = pq.read_table(shard)
    pq.write_table(table.slice(1), shard)  # a row vanished, no takedown recorded it
    r = subprocess.run([PMD, "build", "coco", str(coco_inputs.karpathy),
                        *sum((["--images", str(z)] for z in coco_inputs.zips), []), "--out", str(corpus),
                        "--executor", "local", "--shard-rows", "20", "--row-group-rows", "6", "--image-size", "32",
                        "-q", "--retry-failures"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "kept index; was the shard replaced?" in r.stderr


def test_a_takedown_killed_midway_then_a_retry_then_the_rerun_is_consistent(coco_inputs, built, tmp_path,
                                                                             monkeypatch):
    corpus = tmp_path / "corpus"
    shutil.copytree(built, corpus)
    keys = all_keys(corpus)
    victims = [keys[0], keys[25], keys[-1]]  # three shards
    victims_file = write_list(tmp_path / "k.txt", victims)
    # dies after the record, the journal, the removed rows and one shard are written
    calls = apply_killed_after(4, corpus, victims_file, monkeypatch)
    assert Path(calls[-1]).parent.name == "shards"

    build(coco_inputs, corpus, "--retry-failures")  # the recorded request is applied by the build
    assert verify(corpus) == [] and not set(victims) & set(all_keys(corpus))
    done = snapshot(corpus)
    assert apply(corpus, read_request("keys", victims_file))["applied"] is False  # only the journal is dropped
    assert not list((corpus / "takedowns").glob("*.pending.parquet"))
    assert {k: v for k, v in snapshot(corpus).items() if "pending" not in k} == \
        {k: v for k, v in done.items() if "pending" not in k}
    acc = json.loads((corpus / "manifest.json").read_text())["accounting"]["coco"]
    assert acc["failures_by_reason"]["takedown"] == 3
