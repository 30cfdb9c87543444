"""What a build is told about evaluation images, and the two screens made from it (typed config, one place).

`flickr_ids`: metadata files naming evaluation photos by Flickr id (`pmd.eval_ids`), screened before download;
`against`: the evaluation images themselves (`pmd.decontaminate`), screened by pHash after processing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pmd import storage
from pmd.decontaminate import DEFAULT_THRESHOLD, EvalHashIndex


@dataclass
class EvalScreenOptions:
    # Local paths or URLs on object storage (pmd.storage.location)
    against: list[Path | str] = field(default_factory=list)  # --decontaminate-against PATH (folders, zips, tars)
    flickr_ids: list[Path | str] = field(default_factory=list)  # --eval-flickr-ids PATH (Karpathy / COCO json)
    threshold: int = DEFAULT_THRESHOLD  # --eval-hash-threshold: largest pHash Hamming distance taken as a copy

    def __post_init__(self) -> None:
        self.against = [storage.location(p) for p in
                        ([self.against] if isinstance(self.against, (str, Path)) else self.against)]
        self.flickr_ids = [storage.location(p) for p in
                           ([self.flickr_ids] if isinstance(self.flickr_ids, (str, Path)) else self.flickr_ids)]
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or not 0 <= self.threshold < 64:
            raise ValueError(f"the evaluation hash threshold must be an int within [0, 63], got {self.threshold!r}")

    @property
    def paths(self) -> list[Path | str]:
        return [*self.flickr_ids, *self.against]

    def to_dict(self) -> dict:
        return {"against": [str(p) for p in self.against], "flickr_ids": [str(p) for p in self.flickr_ids],
                "threshold": self.threshold}

    def load(self) -> tuple[dict[int, str] | None, EvalHashIndex | None]:
        """(Flickr id -> evaluation image, pHash index): each None when not asked for."""
        from pmd.eval_ids import load_eval_flickr_ids

        ids = load_eval_flickr_ids(self.flickr_ids) if self.flickr_ids else None
        index = EvalHashIndex.build(self.against, self.threshold) if self.against else None
        return ids, index
