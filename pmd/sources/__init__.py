"""The source registry: PMD subset name -> adapter class, imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from pmd.config_loader import ConfigError, Where, from_dict
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

    Unknown option names and values that do not convert are a ConfigError (a ValueError) naming the option and
    what it takes (pmd.config_loader), never silently ignored.
    """
    cls = adapter_class(name)
    options = dict(options or {})
    options_cls = getattr(cls, "Options", None)
    if options_cls is None:
        if options:
            raise ConfigError(f"source {name!r} takes no options (got {', '.join(sorted(options))})")
        return cls()
    return cls(from_dict(options_cls, options, Where(f"source {name!r}", "options")))


__all__ = ["SOURCE_NAMES", "UnknownSourceError", "adapter_class", "create_adapter"]
