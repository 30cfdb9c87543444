"""Hash partitions on disk: exact distinct counts and joins over more rows than fit in memory.

Rows are spread over `n` Arrow IPC stream files by a hash of one column, so that every row with a given value
lands in the same file. A distinct count, a group-by or an anti-join on that column is then the sum (or union)
of the same operation on each file, and memory is bounded by the largest file instead of the whole corpus.
`partitions_for(rows)` sizes `n` so that a partition holds about `PARTITION_ROWS` rows.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

# About 20 MB of hex digests per partition: reading one back and grouping it stays small next to the interpreter.
PARTITION_ROWS = 1 << 18
_HASH_SEED = 0x9E3779B9  # fixed: one run must send equal values to one file; it need not match any other run


def partitions_for(rows: int) -> int:
    return max(1, -(-rows // PARTITION_ROWS))


def _allow_open_files(n: int) -> None:
    """Every partition's file stays open while the shards are read: 70M rows are ~270 files per partitioning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * n + 256  # two partitionings at once (images and keys, or both builds of a comparison)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))


class HashPartitions:
    """`n` spill files under `directory`, keyed by `column`; `write` appends, `frames` reads them back one by one."""

    compression = "zstd"  # hex digests halve; as fast as lz4 here

    def __init__(self, directory: Path, name: str, n: int, column: str, schema: dict[str, pl.DataType]):
        self.directory, self.name, self.n, self.column = Path(directory), name, n, column
        self.schema = pl.Schema(schema)
        self._arrow_schema = pl.DataFrame(schema=self.schema).to_arrow().schema
        self._writers: dict[int, tuple[object, ipc.RecordBatchStreamWriter]] = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        _allow_open_files(n)

    def _path(self, i: int) -> Path:
        return self.directory / f"{self.name}-{i:05d}.arrow"

    def write(self, frame: pl.DataFrame) -> None:
        if not frame.height:
            return
        frame = frame.select([pl.col(c).cast(t) for c, t in self.schema.items()])
        if self.n == 1:
            self._append(0, frame.to_arrow())
            return
        # One conversion and one gather for the whole frame, then zero-copy slices per partition.
        part = (frame[self.column].hash(_HASH_SEED) % self.n).cast(pl.UInt32)
        table = frame.with_columns(part.alias("_part")).sort("_part").drop("_part").to_arrow()
        counts = np.bincount(part.to_numpy(), minlength=self.n)
        start = 0
        for i in np.flatnonzero(counts):
            self._append(int(i), table.slice(start, int(counts[i])))
            start += int(counts[i])

    def _append(self, i: int, table: pa.Table) -> None:
        if i not in self._writers:
            sink = pa.OSFile(str(self._path(i)), "wb")
            options = ipc.IpcWriteOptions(compression=self.compression)
            self._writers[i] = (sink, ipc.new_stream(sink, self._arrow_schema, options=options))
        self._writers[i][1].write_table(table.cast(self._arrow_schema) if table.schema != self._arrow_schema
                                        else table)

    def close(self) -> None:
        for sink, writer in self._writers.values():
            writer.close()
            sink.close()

    def frame(self, i: int) -> pl.DataFrame:
        """Partition i (empty, with the schema, when nothing was written to it). Call after `close`."""
        if i not in self._writers:
            return pl.DataFrame(schema=self.schema)
        with pa.memory_map(str(self._path(i))) as source:
            table = ipc.open_stream(source).read_all()
        self._path(i).unlink()  # read once: free the disk as the partitions are consumed
        return pl.from_arrow(table, schema=self.schema)

    def frames(self) -> Iterator[pl.DataFrame]:
        for i in range(self.n):
            yield self.frame(i)
