"""Adapters are stateless: `convert(record, context)` gives the same rows in a fresh process, on an adapter instance
that never saw the inputs, as `iter_converted` does in-process. A `convert` that leaned on anything `prepare` or
`records` left on the instance (as Visual Genome and LN-COCO once did) fails here."""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from pmd.schema import SOURCE_NAMES
from pmd.sources import create_adapter
from pmd.sources.base import Pair, Record, Reject, SourceAdapter
from tests.pmd.sources import test_localized_narratives as ln
from tests.pmd.sources import test_visual_genome as vg
from tests.pmd.sources._karpathy_fixtures import REAL_COCOID, document, write_karpathy
from tests.pmd.sources.hostile_cases import ADAPTERS


def _convert_fresh(source: str, options: dict[str, str], context: object, records: list[Record]
                   ) -> list[Pair | Reject]:
    """In the child process: a new adapter, the records and the context, nothing else."""
    adapter = create_adapter(source, options)
    return [out for record in records for out in adapter.convert_limited(record, context)]


def _cases(tmp_path: Path) -> Iterator[tuple[str, str, dict[str, str], list[Path]]]:
    """(label, source, options, inputs): a valid sample of every adapter, and the two with a context at work."""
    for adapter in ADAPTERS:
        folder = tmp_path / adapter.label
        folder.mkdir()
        (folder / adapter.main).write_bytes(adapter.sample)
        for name, data in adapter.others.items():
            (folder / name).write_bytes(data)
        yield adapter.label, adapter.source, adapter.options, [folder / n for n in (*adapter.others, adapter.main)]
    # Visual Genome with its image data and a Karpathy split that drops one image (the context's both halves).
    yield "vg_decontaminated", "visual_genome", {}, vg.inputs(tmp_path / "vg")
    # LN-COCO dropping a Karpathy val/test image.
    items = [ln.narrative("mscoco_val2017", str(i), 1, "A dog. A cat.") for i in (REAL_COCOID, 5)]
    (tmp_path / "ln").mkdir()
    yield "ln_coco_decontaminated", "localized_narratives__coco", {}, [
        write_karpathy(tmp_path / "ln", document()), ln.write(tmp_path / "ln", "coco_val_captions.jsonl", items)]


def test_convert_in_a_fresh_process_with_only_the_context(tmp_path: Path) -> None:
    cases = list(_cases(tmp_path))
    assert {source for _, source, _, _ in cases} == set(SOURCE_NAMES)
    spawn = multiprocessing.get_context("spawn")  # nothing of this process's adapters or caches is inherited
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        for label, source, options, inputs in cases:
            expected = list(create_adapter(source, options).iter_converted(inputs))
            assert any(isinstance(out, Pair) for out in expected), label
            context = create_adapter(source, options).prepare(inputs)
            records = list(create_adapter(source, options).records(inputs))
            got = pool.submit(_convert_fresh, source, options, context, records).result(timeout=120)
            assert got == expected, label
    by_label = {label: (source, options, inputs) for label, source, options, inputs in cases}
    source, options, inputs = by_label["vg_decontaminated"]
    assert [out for out in create_adapter(source).iter_converted(inputs) if isinstance(out, Pair)] == vg.KEPT


def test_contexts_are_plain_values_that_pickle(tmp_path: Path) -> None:
    """What travels to workers is the context itself: pickled and loaded again it is equal, and adapters hold only
    their options (an instance after `prepare` and `records` pickles to what a new one does)."""
    for label, source, options, inputs in _cases(tmp_path):
        adapter = create_adapter(source, options)
        before = pickle.dumps(adapter)
        context = adapter.prepare(inputs)
        list(adapter.records(inputs))
        assert pickle.dumps(adapter) == before, label
        assert pickle.loads(pickle.dumps(context)) == context, label


def test_an_adapter_must_declare_all_three_steps() -> None:
    class NoPrepare(SourceAdapter):
        name = "no_prepare"

        def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
            return iter(())

        def convert(self, record: Record, context: None) -> Iterator[Pair | Reject]:
            return iter(())

    with pytest.raises(TypeError, match="prepare"):
        NoPrepare()  # type: ignore[abstract]
