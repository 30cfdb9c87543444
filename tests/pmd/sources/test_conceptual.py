"""CC3M and CC12M adapters: the real CC3M sample rows, crafted CC12M lines, bad rows, compressed inputs."""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import pytest

from pmd.sources import create_adapter
from pmd.sources.base import InputError, Pair, Reason, Reject
from pmd.sources.conceptual import Conceptual12mAdapter, ConceptualCaptionsAdapter
from tests.real_fixtures import REAL as REAL_FIXTURES

REAL_CC3M = REAL_FIXTURES / "cc3m_sample.tsv"

FIRST_URL = "https://i.pinimg.com/736x/66/01/6c/66016c3ba27c0e04f39e2bd81a934e3e--anita-ekberg-bob-hope.jpg"
LAST_URL = ("http://l7.alamy.com/zooms/5e84d0b73a544fe8a8e5ac0d20052685/"
            "a-man-on-a-lambretta-scooter-taking-part-in-the-daily-express-rally-ddmmff.jpg")


def cc3m(inputs: list[Path]) -> list[Pair | Reject]:
    return list(ConceptualCaptionsAdapter().iter_converted(inputs))


def cc12m(inputs: list[Path]) -> list[Pair | Reject]:
    return list(Conceptual12mAdapter().iter_converted(inputs))


@pytest.fixture
def validation_file(tmp_path: Path) -> Path:
    """The real rows (they come from the validation file) under their upstream file name."""
    path = tmp_path / "Validation_GCC-1.1.0-Validation.tsv"
    shutil.copyfile(REAL_CC3M, path)
    return path


def test_real_cc3m_rows() -> None:
    result = cc3m([REAL_CC3M])
    assert len(result) == 30
    assert all(isinstance(item, Pair) for item in result)
    assert result[0] == Pair(
        key="conceptual_captions/cc3m_sample/1",
        text="author : a life in photography -- in pictures",
        split="train",
        meta='{"file":"cc3m_sample.tsv","line":1}',
        image_url=FIRST_URL,
    )
    assert result[-1] == Pair(
        key="conceptual_captions/cc3m_sample/30",
        text="a man on a scooter , taking part in the rally",
        split="train",
        meta='{"file":"cc3m_sample.tsv","line":30}',
        image_url=LAST_URL,
    )
    assert len({p.key for p in result}) == 30


def test_real_rows_under_upstream_name(validation_file: Path) -> None:
    result = cc3m([validation_file])
    assert {p.split for p in result} == {"validation"}
    assert result[0] == Pair(
        key="conceptual_captions/Validation_GCC-1.1.0-Validation/1",
        text="author : a life in photography -- in pictures",
        split="validation",
        meta='{"file":"Validation_GCC-1.1.0-Validation.tsv","line":1}',
        image_url=FIRST_URL,
    )


def test_real_rows_gzipped(tmp_path: Path) -> None:
    path = tmp_path / "Train_GCC-training.tsv.gz"
    path.write_bytes(gzip.compress(REAL_CC3M.read_bytes()))
    result = cc3m([path])
    assert len(result) == 30
    assert result[-1] == Pair(
        key="conceptual_captions/Train_GCC-training/30",
        text="a man on a scooter , taking part in the rally",
        split="train",
        meta='{"file":"Train_GCC-training.tsv.gz","line":30}',
        image_url=LAST_URL,
    )


def test_train_and_validation_keys_do_not_collide(tmp_path: Path, validation_file: Path) -> None:
    train = tmp_path / "Train_GCC-training.tsv"
    shutil.copyfile(REAL_CC3M, train)
    result = cc3m([train, validation_file])
    assert len(result) == 60
    assert len({p.key for p in result}) == 60
    assert [p.split for p in result] == ["train"] * 30 + ["validation"] * 30


def test_cc3m_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_bytes(
        # a tab inside the caption: the URL is the last field
        b"a  dog runs\ton the beach\thttp://example.com/dog.jpg\n"
        b"caf\xe9 by night\thttp://example.com/cafe.jpg\n"
        b"only one column\n"
        b"\n"
        b"a caption\tnot-a-url\n"
        b"   \thttp://example.com/empty.jpg\n"
        b"a river\r\n"  # CRLF and no tab
    )
    file = str(path)
    assert cc3m([path]) == [
        Pair(key="conceptual_captions/Train_GCC-training/1", text="a dog runs on the beach", split="train",
             meta='{"file":"Train_GCC-training.tsv","line":1}', image_url="http://example.com/dog.jpg"),
        Reject(reason=Reason.INVALID_UTF8, input_file=file, position=2,
               record="caf\\xe9 by night\thttp://example.com/cafe.jpg"),
        Reject(reason=Reason.WRONG_FIELD_COUNT, input_file=file, position=3,
               detail="expected 2 tab-separated fields, got 1", record="only one column"),
        Reject(reason=Reason.MALFORMED, input_file=file, position=4, detail="blank line", record=""),
        Reject(reason=Reason.NO_URL, input_file=file, position=5, key="conceptual_captions/Train_GCC-training/5",
               detail="not an http(s) URL: 'not-a-url'", record="a caption\tnot-a-url"),
        Reject(reason=Reason.EMPTY_TEXT, input_file=file, position=6, key="conceptual_captions/Train_GCC-training/6",
               record="   \thttp://example.com/empty.jpg"),
        Reject(reason=Reason.WRONG_FIELD_COUNT, input_file=file, position=7,
               detail="expected 2 tab-separated fields, got 1", record="a river"),
    ]


CC12M_LINES = (
    b"https://example.com/a.jpg\t<PERSON> was the first  to see this\n"
    b"http://example.com/b.jpg\tcaption with\ta tab inside\n"
    b"https://example.com/c.jpg\tSmall caf\xc3\xa9 \xe2\x80\x94 interior\n"
    b"https://example.com/d.jpg\tsp\xe4ter\n"
    b"https://example.com/e.jpg\n"
    b"\n"
    b"www.example.com/f.jpg\ta caption\n"
    b"https://example.com/g.jpg\t \n"
)


def expected_cc12m(file: str) -> list[Pair | Reject]:
    return [
        Pair(key="conceptual_12m/1", text="<PERSON> was the first to see this", split="train",
             meta=f'{{"file":"{Path(file).name}","line":1}}', image_url="https://example.com/a.jpg"),
        Pair(key="conceptual_12m/2", text="caption with a tab inside", split="train",
             meta=f'{{"file":"{Path(file).name}","line":2}}', image_url="http://example.com/b.jpg"),
        Pair(key="conceptual_12m/3", text="Small café — interior", split="train",
             meta=f'{{"file":"{Path(file).name}","line":3}}', image_url="https://example.com/c.jpg"),
        Reject(reason=Reason.INVALID_UTF8, input_file=file, position=4,
               record="https://example.com/d.jpg\tsp\\xe4ter"),
        Reject(reason=Reason.WRONG_FIELD_COUNT, input_file=file, position=5,
               detail="expected 2 tab-separated fields, got 1", record="https://example.com/e.jpg"),
        Reject(reason=Reason.MALFORMED, input_file=file, position=6, detail="blank line", record=""),
        Reject(reason=Reason.NO_URL, input_file=file, position=7, key="conceptual_12m/7",
               detail="not an http(s) URL: 'www.example.com/f.jpg'", record="www.example.com/f.jpg\ta caption"),
        Reject(reason=Reason.EMPTY_TEXT, input_file=file, position=8, key="conceptual_12m/8",
               record="https://example.com/g.jpg\t "),
    ]


def test_cc12m(tmp_path: Path) -> None:
    path = tmp_path / "cc12m.tsv"
    path.write_bytes(CC12M_LINES)
    assert cc12m([path]) == expected_cc12m(str(path))


def test_cc12m_gz(tmp_path: Path) -> None:
    path = tmp_path / "cc12m.tsv.gz"
    path.write_bytes(gzip.compress(CC12M_LINES))
    assert cc12m([path]) == expected_cc12m(str(path))


def test_truncated_gz(tmp_path: Path) -> None:
    path = tmp_path / "cc12m.tsv.gz"
    path.write_bytes(gzip.compress(CC12M_LINES * 500)[:-20])
    with pytest.raises(InputError) as info:
        cc12m([path])
    assert info.value.path == str(path)
    assert str(path) in str(info.value) and "truncated" in str(info.value)
    assert info.value.position is not None and info.value.position > 0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file") as info:
        cc3m([tmp_path / "Train_GCC-training.tsv"])
    assert info.value.path == str(tmp_path / "Train_GCC-training.tsv")


def test_registry_and_pickling() -> None:
    for name, cls in (("conceptual_captions", ConceptualCaptionsAdapter), ("conceptual_12m", Conceptual12mAdapter)):
        adapter = create_adapter(name)
        assert isinstance(adapter, cls) and adapter.name == name and adapter.inputs_help
    adapter = pickle.loads(pickle.dumps(ConceptualCaptionsAdapter()))
    records = pickle.loads(pickle.dumps(list(adapter.records([REAL_CC3M]))))
    assert [x for r in records for x in adapter.convert(r, None)] == cc3m([REAL_CC3M])
