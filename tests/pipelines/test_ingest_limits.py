"""The limits on both executors: an over-long line and an over-long caption are the same rejections, in the same
parts, whether chunks run in-process or as Ray tasks (LineRange, LineBlock and record lists all cross the pickle)."""

import gzip

import pytest

from pipelines.ingest import IngestConfig, run_ingest
from pmd.sources.base import Reason, caption_limits
from tests.pipelines.test_ingest import read_dir


@pytest.mark.slow
@pytest.mark.parametrize(("source", "name"), [
    ("conceptual_captions", "Train_GCC-training.tsv"),  # byte ranges
    ("conceptual_captions", "Train_GCC-training.tsv.gz"),  # line blocks
    ("localized_narratives__openimages", "open_images_train_v6_captions.jsonl"),  # record lists
])
def test_ray_and_local_reject_the_same_over_long_rows(tmp_path, ray_local, source, name):
    too_long = "w " * (caption_limits(source).max_words + 1)
    if source == "conceptual_captions":
        rows = [f"a dog {i}\thttp://x.org/{i}.jpg" for i in range(30)]
        rows[7] = "x" * 5_000_000 + "\thttp://x.org/big.jpg"
        rows[20] = f"{too_long}\thttp://x.org/long.jpg"
    else:
        def line(i, caption):
            return f'{{"dataset_id": "oi", "image_id": "{i:x}", "annotator_id": 1, "caption": "{caption}"}}'
        rows = [line(i, f"A dog {i}.") for i in range(30)]
        rows[7] = line(7, "x" * 5_000_000)
        rows[20] = line(20, too_long.strip() + ".")
    data = ("\n".join(rows) + "\n").encode()
    src = tmp_path / name
    src.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    summaries = {}
    for executor in ("local", "ray"):
        summaries[executor] = run_ingest(IngestConfig(source, [src], tmp_path / executor, executor=executor,
                                                      chunk_records=8, progress=False))
    local, ray_ = summaries["local"], summaries["ray"]
    assert ray_["counts"] == local["counts"] and ray_["parts"] == local["parts"] == 4
    assert local["counts"]["rejects_by_reason"] == {Reason.LINE_TOO_LONG: 1, Reason.TOO_LONG: 1}
    for sub in ("candidates", "rejects"):
        assert read_dir(tmp_path / "local" / source / sub).equals(read_dir(tmp_path / "ray" / source / sub))
    rejects = read_dir(tmp_path / "local" / source / "rejects").sort("position")
    assert rejects["position"].to_list() == [8, 21]
