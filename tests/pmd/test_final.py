"""pmd.final's pure parts: the layout's file budget, bucket ranges, and which shards a bucket writes."""

from __future__ import annotations

import hashlib

import pytest

from pmd.final import BUCKET_SHARDS, PIECES_PER_INPUT, Layout, bucket_shards, group_ranges, image_bucket, plan_layout


def test_layout_keeps_piece_files_linear_in_chunks_plus_shards():
    for candidates, chunk_rows, shard_rows in [(70_000_000, 2_000, 10_000), (1_000_000, 2_000, 10_000),
                                               (250, 24, 64), (5, 2_000, 10_000)]:
        chunks = -(-candidates // chunk_rows)
        shards = -(-candidates // shard_rows)
        layout = plan_layout([chunks], candidates, shard_rows, 1000)
        groups = len(group_ranges(layout, chunks))
        assert groups * layout.n_buckets <= max(PIECES_PER_INPUT * (chunks + shards), layout.n_buckets)
        assert layout.n_buckets == max(1, -(-candidates // (BUCKET_SHARDS * shard_rows)))
        assert sorted(i for r in group_ranges(layout, chunks) for i in r) == list(range(chunks))
    pmd = plan_layout([35_000], 70_000_000, 10_000, 1000)
    assert pmd.n_buckets == 1_750 and len(group_ranges(pmd, 35_000)) == 48


def test_image_bucket_is_a_range_of_the_digest():
    digests = sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000))
    buckets = [image_bucket(d, 7) for d in digests]
    assert buckets == sorted(buckets) and set(buckets) == set(range(7))  # monotone: a range partition
    counts = [buckets.count(b) for b in range(7)]
    assert max(counts) < 1.25 * 4000 / 7 and min(counts) > 0.75 * 4000 / 7
    assert image_bucket("f" * 64, 7) == 6 and image_bucket("0" * 64, 7) == 0


def test_bucket_shards_cut_at_global_boundaries():
    # Buckets of 5, 12 and 3 rows, shards of 4: positions 0-4 | 5-16 | 17-19.
    assert bucket_shards(0, 5, 20, 4) == [(0, 0, 4, True), (1, 4, 5, False)]
    assert bucket_shards(5, 12, 20, 4) == [(1, 0, 3, False), (2, 3, 7, True), (3, 7, 11, True),
                                           (4, 11, 12, False)]
    assert bucket_shards(17, 3, 20, 4) == [(4, 0, 3, False)]
    assert bucket_shards(20, 0, 20, 4) == []
    # The last shard is short: whole when the bucket holds all of it.
    assert bucket_shards(16, 2, 18, 4) == [(4, 0, 2, True)]
    assert Layout(1, 1, 4, 1).to_dict()["shard_rows"] == 4


def test_b2_uses_the_ordered_file_only_while_its_pieces_and_decision_inputs_are_the_same():
    """B1 on object storage writes the bucket's kept rows in corpus order; B2 reads them instead of the pieces only
    if the bucket still has the same pieces (a retry adds some) and the same takedowns and placeholder threshold."""
    from types import SimpleNamespace

    import pyarrow as pa

    from pmd import final, storage
    from pmd.build import write_ipc_atomic

    paths = final.FinalPaths(storage.as_path("memory://ordered-test/w"))
    pieces = [paths.bucket_dir(0) / "retry-00-00000-a02.arrow", paths.bucket_dir(0) / "retry-00-00001-a02.arrow"]
    packed = [["coco", 0, 0, 100, 3], ["coco", 1, 512, 90, 2]]  # the bucket's ranges of two groups' packs
    requests = SimpleNamespace(requests=[SimpleNamespace(id="r1")])
    rows = pa.table({"key": ["b", "a"]})
    write_ipc_atomic(rows.replace_schema_metadata(final._ordered_metadata(pieces, packed, requests, 3)),
                     paths.ordered(0))
    ordered = final._ordered_rows  # (paths, bucket, pieces, packed, takedowns, placeholder_min_urls)
    assert ordered(paths, 0, pieces[::-1], packed, requests, 3).equals(rows)  # the listing's order is no input
    assert ordered(paths, 0, [*pieces, paths.bucket_dir(0) / "retry-00-00002-a03.arrow"], packed, requests,
                   3) is None
    assert ordered(paths, 0, pieces, packed[:1], requests, 3) is None  # a pack's range fewer
    assert ordered(paths, 0, pieces, [packed[0], ["coco", 1, 512, 91, 2]], requests, 3) is None  # another range
    assert ordered(paths, 0, pieces, packed, None, 3) is None
    assert ordered(paths, 0, pieces, packed, SimpleNamespace(requests=[SimpleNamespace(id="r2")]), 3) is None
    assert ordered(paths, 0, pieces, packed, requests, 4) is None
    assert ordered(paths, 1, pieces, packed, requests, 3) is None  # none written
    local = final.FinalPaths(storage.as_path("/nonexistent-work"))
    assert ordered(local, 0, pieces, packed, requests, 3) is None  # on disk B2 always reads the pieces


def _piece_rows(n: int, start: int):
    """`n` rows of PIECE_SCHEMA (distinct keys and bytes), as a scatter task appends them."""
    import pyarrow as pa

    from pmd import final

    columns = {}
    for field in final.PIECE_SCHEMA:
        if pa.types.is_string(field.type):
            values = [f"{field.name}-{start + i}" for i in range(n)]
        elif pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            values = [hashlib.sha256(f"{start + i}".encode()).digest() * 40 for i in range(n)]
        elif pa.types.is_integer(field.type):
            values = [start + i for i in range(n)]
        else:
            values = [None] * n
        columns[field.name] = pa.array(values, field.type)
    return pa.table(columns, schema=final.PIECE_SCHEMA)


def test_a_groups_pack_holds_each_buckets_piece_at_the_range_its_marker_records(monkeypatch):
    """On object storage a scatter group's pieces are one object: each bucket's rows come back from its range
    alone, whole and in the order appended, with the metadata columns alone on request; two writers fed the same
    tables upload the same bytes (two attempts of one group race on one name); a range whose row count is not the
    marker's is an error; packs named as consumed are no bucket's input, and releasing them records them first."""
    import pyarrow as pa

    from pmd import final, storage

    monkeypatch.setattr(final, "FLUSH_BYTES", 4096)  # several record batches per bucket, flushed in turns
    dirs = final.BuildDirs(f"memory://pack-test-{id(monkeypatch)}/out", f"memory://pack-test-{id(monkeypatch)}/w")
    paths = dirs.paths
    appended = {0: [_piece_rows(30, 0), _piece_rows(7, 100)], 2: [_piece_rows(1, 200)], 5: [_piece_rows(50, 300)]}

    def write(pack) -> final._PieceWriters:
        writers = final._PieceWriters(paths, "group-00-00003.arrow", pack)
        for i in range(2):
            for b, tables in appended.items():
                if i < len(tables):
                    writers.add(b, tables[i])
        assert writers.commit() == {b: sum(t.num_rows for t in ts) for b, ts in appended.items()}
        return writers

    writers = write(paths.pack("coco", 3))
    first = storage.read_bytes(str(paths.pack("coco", 3)))
    assert write(paths.pack("coco", 3)).ranges == writers.ranges and storage.read_bytes(
        str(paths.pack("coco", 3))) == first
    assert not storage.list_files(str(paths.root / "pieces"), recursive=True)  # no piece objects of its own
    marker = {"source": "coco", "source_index": 0, "group": 3, "pack": {str(b): list(r)
                                                                          for b, r in writers.ranges.items()}}
    other = {"source": "cc12m", "source_index": 1, "group": 0, "pack": {"2": [0, 1, 1]}}
    packed = final.pack_ranges([other, marker], set())
    assert sorted(packed) == [0, 2, 5] and packed[2][0][:2] == ["coco", 3] and packed[2][1][:2] == ["cc12m", 0]
    for b, tables in appended.items():
        got = final._bucket_table(paths, [], packed[b][:1], None)
        assert got.equals(pa.concat_tables(tables))
        assert final._bucket_table(paths, [], packed[b][:1], final.METADATA_COLUMNS).equals(
            pa.concat_tables(tables).select(final.METADATA_COLUMNS))
    source, group, offset, length, rows = packed[5][0]
    with pytest.raises(RuntimeError, match="rows"):
        final._read_packed(paths, [source, group, offset, length, rows + 1], None)
    # Local work keeps a piece file per bucket (memory-mapped, metadata columns read alone): no pack.
    assert final.pack_ranges([{**marker, "pack": {}}], set()) == {}

    final.release_packs(dirs, {b: r[:1] for b, r in packed.items()})
    assert final.consumed_packs(dirs) == {"coco/group-00003"}
    assert not storage.list_files(str(paths.root / final.PACKS_DIR), recursive=True)
    assert final.pack_ranges([other, marker], final.consumed_packs(dirs)) == {2: [["cc12m", 0, 0, 1, 1]]}
    final.release_packs(dirs, {})  # again (a resumed build): the record stays
    assert final.consumed_packs(dirs) == {"coco/group-00003"}
