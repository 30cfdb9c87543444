"""The source registry: PMD subset name -> adapter class, imported on first use."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Mapping

from pmd.schema import SOURCE_NAMES
from pmd.sources.base import SourceAdapter

# name -> "module:Class". Lazy, so `pmd sources` does not import twelve parsers (and fastText) to print a table.
_ADAPTERS: dict[str, str] = {
    "coco": "pmd.sources.coco:CocoAdapter",
    "sbu_captions": "pmd.sources.sbu:SbuAdapter",
    "localized_narratives__coco": "pmd.sources.localized_narratives:LocalizedNarrativesCoco",
    "localized_narratives__flickr30k": "pmd.sources.localized_narratives:LocalizedNarrativesFlickr30k",
    "localized_narratives__ADE20k": "pmd.sources.localized_narratives:LocalizedNarrativesAde20k",
    "localized_narratives__openimages": "pmd.sources.localized_narratives:LocalizedNarrativesOpenImages",
    "conceptual_captions": "pmd.sources.conceptual:ConceptualCaptionsAdapter",
    "visual_genome": "pmd.sources.visual_genome:VisualGenomeAdapter",
    "wit": "pmd.sources.wit:WitAdapter",
    "conceptual_12m": "pmd.sources.conceptual:Conceptual12mAdapter",
    "red_caps": "pmd.sources.red_caps:RedCapsAdapter",
    "yfcc100m": "pmd.sources.yfcc:YfccAdapter",
}
assert tuple(_ADAPTERS) == SOURCE_NAMES


class UnknownSourceError(ValueError):
    pass


def adapter_class(name: str) -> type[SourceAdapter]:
    try:
        target = _ADAPTERS[name]
    except KeyError:
        raise UnknownSourceError(f"unknown source {name!r}; known sources: {', '.join(SOURCE_NAMES)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_adapter(name: str, options: Mapping[str, str] | None = None) -> SourceAdapter:
    """An adapter instance. `options` (strings, from `-o key=value`) fill the adapter's `Options` dataclass, if any.

    Unknown option names and values that do not convert are a clear ValueError, never silently ignored.
    """
    cls = adapter_class(name)
    options = dict(options or {})
    options_cls = getattr(cls, "Options", None)
    if options_cls is None:
        if options:
            raise ValueError(f"source {name!r} takes no options (got {', '.join(sorted(options))})")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown option(s) for {name!r}: {', '.join(unknown)}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(options_cls)
    values = {}
    for key, raw in options.items():
        kind = hints[key]
        if isinstance(kind, types.UnionType):  # `float | None` -> float
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        values[key] = _convert_option(name, key, raw, kind)
    return cls(options_cls(**values))


def _convert_option(source: str, key: str, raw: str, kind: type) -> object:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ValueError(f"option {key}={raw!r} for {source!r} is not a valid {kind.__name__}") from None


__all__ = ["SOURCE_NAMES", "UnknownSourceError", "adapter_class", "create_adapter"]
