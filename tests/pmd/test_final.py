"""pmd.final's pure parts: the layout's file budget, bucket ranges, and which shards a bucket writes."""

from __future__ import annotations

import hashlib

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
    pieces = [paths.bucket_dir(0) / "group-00-00000.arrow", paths.bucket_dir(0) / "group-00-00001.arrow"]
    requests = SimpleNamespace(requests=[SimpleNamespace(id="r1")])
    rows = pa.table({"key": ["b", "a"]})
    write_ipc_atomic(rows.replace_schema_metadata(final._ordered_metadata(pieces, requests, 3)), paths.ordered(0))
    assert final._ordered_rows(paths, 0, pieces[::-1], requests, 3).equals(rows)  # the listing's order is no input
    assert final._ordered_rows(paths, 0, [*pieces, paths.bucket_dir(0) / "retry-00-00001-a02.arrow"], requests,
                               3) is None
    assert final._ordered_rows(paths, 0, pieces, None, 3) is None
    assert final._ordered_rows(paths, 0, pieces, SimpleNamespace(requests=[SimpleNamespace(id="r2")]), 3) is None
    assert final._ordered_rows(paths, 0, pieces, requests, 4) is None
    assert final._ordered_rows(paths, 1, pieces, requests, 3) is None  # none written
    local = final.FinalPaths(storage.as_path("/nonexistent-work"))
    assert final._ordered_rows(local, 0, pieces, requests, 3) is None  # on disk B2 always reads the pieces
