"""Hostile input files for every source adapter, and the runner that ingests them inside one capped process.

`build_cases(dir)` writes the files and returns the cases; `python -c "...hostile_cases import main; main()" DIR`
runs them all in one process under RLIMIT_AS (and an alarm per case), through the ingest stage's own chunking and
conversion (`iter_chunks`, `convert_chunk`), and prints one JSON result per case: `error` (an InputError: a clear
message naming the file), `rows` (counts by reason) or `crash` (anything else, with its traceback). A kill or a hang
shows as a missing result or the process's exit status.
"""

from __future__ import annotations

import bz2
import gzip
import json
import random
import resource
import signal
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tests.archive_files import tar_gz_bytes, zip_bytes

ADDRESS_SPACE = 2 * 1024**3
CASE_SECONDS = 30
TEN_MB = 10 * 1000 * 1000
DEEP = b"[" * 100_000 + b"]" * 100_000

_WIT_HEADER = ("language\tpage_url\timage_url\tpage_title\tsection_title\thierarchical_section_title\t"
               "caption_reference_description\tcaption_attribution_description\tcaption_alt_text_description\t"
               "mime_type\toriginal_height\toriginal_width\tis_main_image\tattribution_passes_lang_id\t"
               "page_changed_recently\tcontext_page_description\tcontext_section_description")
_WIT_ROW = ("en\thttps://en.wikipedia.org/wiki/Dog\thttps://upload.wikimedia.org/d.jpg\tDog\t\tDog\tA brown dog\t\t\t"
            "image/jpeg\t100\t200\ttrue\ttrue\tfalse\tDogs are mammals.\t")
_YFCC_ROW = "\t".join(["6985418911", "u@N00", "nick", "2012-03-04 12:00:00.0", "1330862400", "Canon", "my+dog",
                       "a+brown+dog+runs+on+the+beach", "dog", "", "", "", "", "http://www.flickr.com/photos/u/1/",
                       "http://farm8.staticflickr.com/7/6985418911_abc.jpg", "lic", "http://lic", "7", "8", "abc",
                       "def", "jpg", "0"])


@dataclass(frozen=True)
class Adapter:
    """How to feed one adapter: its main input's name and a valid sample of it, other (valid) inputs, options."""

    label: str
    source: str
    main: str
    sample: bytes
    json: bool  # the main input is one JSON document (else lines)
    others: dict[str, bytes] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)


def _j(value) -> bytes:
    return json.dumps(value).encode()


_KARPATHY = _j({"images": [{"filepath": "val2014", "filename": "a.jpg", "imgid": 0, "cocoid": 1, "split": "train",
                            "sentids": [1], "sentences": [{"raw": "A dog on a beach.", "sentid": 1,
                                                           "tokens": ["a", "dog"], "imgid": 0}]}],
                "dataset": "coco"})
_LN_LINE = _j({"dataset_id": "x", "image_id": "1", "annotator_id": 1, "caption": "A dog runs. It is brown.",
               "timed_caption": [{"utterance": "a", "start_time": 0, "end_time": 1}],
               "traces": [[{"x": 0.1, "y": 0.2, "t": 0.3}]], "voice_recording": "v.ogg"}) + b"\n"
_VG_REGIONS = _j([{"id": 1, "regions": [{"region_id": 5, "image_id": 1, "phrase": "a brown dog", "x": 1, "y": 2,
                                         "width": 30, "height": 40}]}])
_VG_IMAGES = _j([{"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "width": 100,
                  "height": 100, "coco_id": None, "flickr_id": None}])
_RED_CAPS = _j({"info": {"subreddit": "dogs"}, "annotations": [
    {"image_id": "a1", "author": "u", "url": "https://i.redd.it/a.jpg", "raw_caption": "My dog",
     "caption": "my dog", "subreddit": "dogs", "score": 1, "created_utc": 1.0, "permalink": "/r/dogs/a1",
     "crosspost_parents": None}]})

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("coco", "coco", "dataset_coco.json", _KARPATHY, True),
    Adapter("sbu_json", "sbu_captions", "sbu-captions-all.json",
            _j({"image_urls": ["http://static.flickr.com/1/2_ab.jpg"], "captions": ["a dog"], "user_ids": ["u"]}),
            True),
    Adapter("sbu_text", "sbu_captions", "SBU_captioned_photo_dataset_captions.txt", b"a dog on the beach\n", False,
            others={"SBU_captioned_photo_dataset_urls.txt": b"http://static.flickr.com/1/2_ab.jpg\n"}),
    Adapter("ln_coco", "localized_narratives__coco", "coco_train_captions.jsonl", _LN_LINE, False,
            options={"decontaminate": "false"}),
    Adapter("ln_coco_karpathy", "localized_narratives__coco", "dataset_coco.json", _KARPATHY, True,
            others={"coco_train_captions.jsonl": _LN_LINE}),
    Adapter("ln_flickr30k", "localized_narratives__flickr30k", "flickr30k_train_captions.jsonl", _LN_LINE, False),
    Adapter("ln_ade20k", "localized_narratives__ADE20k", "ade20k_train_captions.jsonl", _LN_LINE, False),
    Adapter("ln_openimages", "localized_narratives__openimages", "open_images_train_v6_captions.jsonl", _LN_LINE,
            False),
    Adapter("cc3m", "conceptual_captions", "Train_GCC-training.tsv", b"a dog on a beach\thttp://x.org/1.jpg\n", False),
    Adapter("cc12m", "conceptual_12m", "cc12m.tsv", b"http://x.org/1.jpg\ta dog on a beach\n", False),
    Adapter("vg_regions", "visual_genome", "region_descriptions.json", _VG_REGIONS, True,
            others={"image_data.json": _VG_IMAGES}, options={"decontaminate": "false"}),
    Adapter("vg_image_data", "visual_genome", "image_data.json", _VG_IMAGES, True,
            others={"region_descriptions.json": _VG_REGIONS}, options={"decontaminate": "false"}),
    Adapter("wit", "wit", "wit_v1.train.all-00000-of-00010.tsv", f"{_WIT_HEADER}\n{_WIT_ROW}\n".encode(), False),
    Adapter("red_caps", "red_caps", "dogs_2020.json", _RED_CAPS, True),
    Adapter("yfcc", "yfcc100m", "yfcc100m_dataset-0", f"{_YFCC_ROW}\n".encode(), False),
    Adapter("yfcc_subset", "yfcc100m", "yfcc100m_subset.jsonl",
            _j({"image_url": "http://farm8.staticflickr.com/7/6985418911_abc.jpg",
                "texts": ["a brown dog runs on the beach"], "source": "yfcc100m", "meta": {}}) + b"\n", False),
)


def _insert(doc: bytes, member: bytes) -> bytes:
    """`member` as the first key of the innermost object that opens last in `doc`."""
    at = doc.rfind(b"{") + 1
    return doc[:at] + member + b", " + doc[at:]


def _truncate(data: bytes) -> bytes:
    return data[: max(1, len(data) // 2)]


def _zip_member(adapter: Adapter) -> str:
    return f"annotations/{adapter.main}" if adapter.source == "red_caps" else adapter.main


def _variants(adapter: Adapter, rng: random.Random) -> dict[str, tuple[str, bytes]]:
    """variant -> (file name, bytes) of the main input."""
    name, sample = adapter.main, adapter.sample
    big = sample if adapter.json else sample * 2000  # enough to span compressed blocks
    first_line = sample.split(b"\n", 1)[0] + b"\n"
    with_text = sample.replace(b"dog", b"d\xff\xfeog", 1)
    out: dict[str, tuple[str, bytes]] = {
        "valid": (name, sample),
        "empty": (name, b""),
        "random_bytes": (name, rng.randbytes(64 * 1024)),
        "random_lines": (name, b"\n".join(rng.randbytes(rng.randrange(0, 200)) for _ in range(300))),
        "nul_bytes": (name, sample.replace(b" ", b"\x00") + b"\x00" * 64 + b"\n" + sample),
        "bom": (name, b"\xef\xbb\xbf" + sample),
        "crlf": (name, sample.replace(b"\n", b"\r\n")),
        "invalid_utf8": (name, with_text),
        "deep_nesting": (name, DEEP if adapter.json else sample + DEEP + b"\n" + sample),
        "ten_mb_line": (name, _insert(sample, b'"long": "' + b"y" * TEN_MB + b'"') if adapter.json
                        else sample + b"x\t" * 5 + b"y" * TEN_MB + b"\n" + sample),
        "wrong_field_count": (name, b"a\tb\tc\n" + b"one field only\n" + b"\t\t\t\t\t\t\t\t\n" + sample),
        "header_only": (name, first_line if not adapter.json else sample[:1] + sample[-1:]),
        "truncated_gz": (name + ".gz", _truncate(gzip.compress(big))),
        "truncated_bz2": (name + ".bz2", _truncate(bz2.compress(big))),
        "truncated_zip": (name + ".zip", _truncate(zip_bytes({_zip_member(adapter): big}))),
        "truncated_tar_gz": (name + ".tar.gz", _truncate(tar_gz_bytes({adapter.main: big}))),
    }
    if adapter.json:
        # Inside the innermost object of the last element: well-formed JSON that breaks one limit each.
        out["deep_inside_element"] = (name, _insert(sample, b'"deep": ' + b"[" * 1000 + b"]" * 1000))
        out["huge_element"] = (name, _insert(sample, b'"pad": [' + b"1," * (5 * 1024**2) + b"1]"))
    else:
        out["deep_json_line"] = (name, sample + b'{"caption": ' + b"[" * 5000 + b"]" * 5000 + b"}\n" + sample)
    return out




@dataclass
class Case:
    id: str
    adapter: str
    variant: str
    source: str
    inputs: list[str]
    options: dict[str, str]


def build_cases(root: Path, seed: int = 14) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for adapter in ADAPTERS:
        for variant, (name, data) in _variants(adapter, rng).items():
            folder = root / adapter.label / variant
            folder.mkdir(parents=True)
            main = folder / name
            main.write_bytes(data)
            others = []
            for other, content in adapter.others.items():
                (folder / other).write_bytes(content)
                others.append(str(folder / other))
            cases.append(Case(f"{adapter.label}/{variant}", adapter.label, variant, adapter.source,
                              [*others, str(main)], adapter.options))
    (root / "cases.json").write_text(json.dumps([asdict(c) for c in cases]))
    return cases


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"no result after {CASE_SECONDS} s")


def run_case(case: dict) -> dict:
    from pmd.ingest import IngestCounts, convert_chunk, iter_chunks
    from pmd.sources import create_adapter
    from pmd.sources.base import InputError
    from pmd.sources.inputs import LineBlock, LineRange

    signal.alarm(CASE_SECONDS)
    try:
        adapter = create_adapter(case["source"], case["options"])
        counts = IngestCounts()
        inputs = [Path(p) for p in case["inputs"]]
        context = adapter.prepare(inputs)
        for chunk in iter_chunks(adapter, inputs, 1000):
            records = chunk.records() if isinstance(chunk, (LineBlock, LineRange)) else chunk
            pairs, rejects, chunk_counts = convert_chunk(adapter, context, records)
            assert pairs.num_rows == chunk_counts.pairs and rejects.num_rows == chunk_counts.rejects
            counts.add(chunk_counts)
        return {"outcome": "rows", "records": counts.records, "pairs": counts.pairs,
                "rejects": dict(sorted(counts.rejects_by_reason.items()))}
    except InputError as exc:
        return {"outcome": "error", "message": str(exc)[:500]}
    except _Hang as exc:
        return {"outcome": "hang", "message": str(exc)}
    except BaseException:  # noqa: BLE001 - the point is to see anything that is not a clean ending
        return {"outcome": "crash", "traceback": traceback.format_exc()[-3000:]}
    finally:
        signal.alarm(0)


def main() -> None:
    root = Path(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    signal.signal(signal.SIGALRM, _alarm)
    cases = json.loads((root / "cases.json").read_text())
    for case in cases:
        result = run_case(case)
        print(json.dumps({"id": case["id"], **result}), flush=True)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over an exec from the forked parent (a pytest
    # process that has loaded torch reads >1 GB before this runner does anything).
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print(json.dumps({"id": "peak_rss_bytes", "value": peak_kib * 1024}), flush=True)
