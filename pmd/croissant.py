"""OUT/croissant.json: a build described in Croissant (MLCommons' JSON-LD format for ML datasets), with its
Responsible-AI fields, made from the manifest and the catalog alone.

What it holds:
1. the distribution: every shard and failures file the manifest lists, as a `cr:FileObject` with its sha256 and
   size, and one `cr:FileSet` per kind (`shards/*.parquet`, `failures/*.parquet`) that the record sets read;
2. record sets: `sources` (inline: each source's title, licence, pair licence, commercial use, homepage), `pairs`
   (one record per shard row: key, source, caption, image bytes (JPEG) with width and height, url where there is
   one, and the pair's licence through a join of `pairs/source` on `sources/name`) and `failures` (every candidate
   that did not become a pair, with its stage and reason);
3. creators and citations of PMD and of each source (manifests/citations.toml), licences per source;
4. the RAI fields the NeurIPS Datasets and Benchmarks track asks for (collection, preprocessing, missing data,
   limitations, personal and sensitive information, intended use, maintenance), written from the build's own
   counts and settings.

The document is a pure function of the manifest (and the catalog), so a rerun writes the same bytes and
`pmd verify` can tell a stale one (pmd/card.py). `mlcroissant validate` accepts it and `mlcroissant`'s record reader
yields the shards' rows (tests/pmd/test_card.py).
"""

from __future__ import annotations

import pyarrow as pa

from pmd import schema
from pmd.catalog import PMD_CITATION_KEY, CatalogEntry, citations, load_catalog
from pmd.manifest import FAILURES_DIR, SHARDS_DIR, Manifest

CROISSANT_FILE = "croissant.json"
CONFORMS_TO = ("http://mlcommons.org/croissant/1.0", "http://mlcommons.org/croissant/RAI/1.0")
PARQUET = "application/x-parquet"
IMAGE_FORMAT = "image/jpeg"
PMD_URL = "https://huggingface.co/datasets/facebook/pmd"
SHARD_FILES = "shard-files"
FAILURE_FILES = "failure-files"

# The JSON-LD context of Croissant 1.0 (the spec's own), with the RAI vocabulary.
CONTEXT = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}

# Arrow type -> Croissant dataType; a column of another type needs a decision here (a KeyError until then).
_DATA_TYPES = {pa.string(): "sc:Text", pa.int32(): "cr:Int32", pa.int64(): "cr:Int64", pa.float32(): "cr:Float32"}
# Columns whose values are more than their Arrow type says.
_SEMANTIC_TYPES = {schema.IMAGE: "sc:ImageObject", schema.IMAGE_URL: "sc:URL"}
_DESCRIPTIONS = {
    schema.KEY: "stable key of the pair, derived from the upstream ids (SOURCE/...)",
    schema.SOURCE: "the PMD source, as the published facebook/pmd loader names it",
    schema.TEXT: "the caption, cleaned (whitespace, control characters); never truncated",
    schema.IMAGE_URL: "where the image was downloaded from (URL sources); null for archive sources",
    schema.IMAGE_REF: "the archive member the image was read from (archive sources); null for URL sources",
    schema.SPLIT: "the upstream split (train, validation, test)",
    schema.META: "source-specific upstream fields, JSON",
    schema.LANG: "language decided by fastText lid.176 (YFCC100M), else null",
    schema.LANG_SCORE: "the language decision's probability, else null",
    schema.IMAGE: "the image, decoded once, checked, resized and re-encoded: JPEG bytes (encodingFormat image/jpeg)",
    schema.IMAGE_SHA256: "hex sha256 of the stored image bytes",
    schema.WIDTH: "width of the stored image, pixels",
    schema.HEIGHT: "height of the stored image, pixels",
    schema.ORIGINAL_WIDTH: "width of the image as downloaded or read (after a Visual Genome crop), pixels",
    schema.ORIGINAL_HEIGHT: "height of the image as downloaded or read (after a Visual Genome crop), pixels",
    schema.STAGE: "where the candidate left the build (download, read, decode, check, decontaminate, dedup, "
                  "takedown)",
    schema.REASON: "why, short and stable (docs/build-format.md lists them)",
    schema.DETAIL: "the specifics (HTTP status text, the kept key of a duplicate, the takedown request)",
}
_SOURCE_FIELDS = ("name", "title", "licence", "pair_licence", "commercial", "homepage")


def _field(record_set: str, name: str, data_type: str, file_set: str, **extra: object) -> dict:
    return {"@type": "cr:Field", "@id": f"{record_set}/{name}", "name": name,
            "description": _DESCRIPTIONS.get(name, name), "dataType": data_type,
            "source": {"fileSet": {"@id": file_set}, "extract": {"column": name}}, **extra}


def _columns(record_set: str, arrow: pa.Schema, file_set: str) -> list[dict]:
    fields = []
    for column in arrow:
        data_type = _SEMANTIC_TYPES.get(column.name) or _DATA_TYPES[column.type]
        extra: dict = {}
        if record_set == "pairs" and column.name == schema.SOURCE:
            extra["references"] = {"field": {"@id": "sources/name"}}
        if column.name == schema.IMAGE:
            extra["encodingFormat"] = IMAGE_FORMAT  # the bytes as stored: the image stage re-encodes every image
        fields.append(_field(record_set, column.name, data_type, file_set, **extra))
    return fields


def _sources_record_set(entries: list[CatalogEntry]) -> dict:
    return {
        "@type": "cr:RecordSet", "@id": "sources", "name": "sources",
        "description": "the PMD sources of this build, with the licence their pairs are used under",
        "key": {"@id": "sources/name"},
        "field": [{"@type": "cr:Field", "@id": f"sources/{name}", "name": name, "dataType": "sc:Text"}
                  for name in _SOURCE_FIELDS],
        "data": [{f"sources/{name}": getattr(e, name) for name in _SOURCE_FIELDS} for e in entries],
    }


def _pairs_record_set() -> dict:
    fields = _columns("pairs", schema.SHARD_SCHEMA, SHARD_FILES)
    fields.append({"@type": "cr:Field", "@id": "pairs/licence", "name": "licence", "dataType": "sc:Text",
                   "description": "the licence the pair's image is used under (its source's; YFCC100M rows carry "
                                  "their own licence URL in `meta`)",
                   "source": {"field": {"@id": "sources/pair_licence"}}})
    return {"@type": "cr:RecordSet", "@id": "pairs", "name": "pairs", "key": {"@id": "pairs/key"},
            "description": "one image-text pair per shard row", "field": fields}


def _failures_record_set() -> dict:
    return {"@type": "cr:RecordSet", "@id": "failures", "name": "failures",
            "description": "every candidate that did not become a pair, with the stage and the reason",
            "field": _columns("failures", schema.FAILURE_SCHEMA, FAILURE_FILES)}


def _distribution(manifest: Manifest) -> list[dict]:
    files = []
    for entry in (*manifest.shards, *manifest.failures):
        files.append({"@type": "cr:FileObject", "@id": entry.file, "name": entry.file, "contentUrl": entry.file,
                      "encodingFormat": PARQUET, "contentSize": f"{entry.bytes} B", "sha256": entry.sha256})
    files.append({"@type": "cr:FileSet", "@id": SHARD_FILES, "name": SHARD_FILES, "encodingFormat": PARQUET,
                  "includes": f"{SHARDS_DIR}/*.parquet", "description": "the shards: SHARD_SCHEMA, pre-shuffled"})
    if manifest.failures:
        files.append({"@type": "cr:FileSet", "@id": FAILURE_FILES, "name": FAILURE_FILES, "encodingFormat": PARQUET,
                      "includes": f"{FAILURES_DIR}/*.parquet", "description": "the failures: FAILURE_SCHEMA"})
    return files


def built_sources(manifest: Manifest) -> list[CatalogEntry]:
    """The catalog entries of the sources this build holds, in the catalog's order."""
    names = set(manifest.accounting) | set(manifest.data.get("sources", {}))
    return [e for e in load_catalog() if e.name in names]


def _reasons(manifest: Manifest) -> str:
    by_reason = manifest.data.get("totals", {}).get("failures_by_reason", {})
    return ", ".join(f"{reason} {n:,}" for reason, n in sorted(by_reason.items(), key=lambda x: (-x[1], x[0])))


def rai_fields(manifest: Manifest) -> dict:
    """The Responsible-AI fields, from what this build did and counted."""
    totals = manifest.data.get("totals", {})
    config = manifest.data.get("config", {})
    decon = config.get("decontaminate", {})
    takedowns = manifest.data.get("takedowns", [])
    overlap = totals.get("failures_by_reason", {}).get("eval_overlap", 0)
    url_sources = [e.name for e in built_sources(manifest) if e.images == "url"]
    return {
        "rai:dataCollection": (
            "Rebuilt with pmd from the public upstream metadata of each source (manifests/sources.toml). Images of "
            "URL sources were downloaded from the URLs the metadata names, at build time; images of archive "
            "sources were read from the published archives. Captions are the upstream captions."),
        "rai:dataCollectionType": ["Secondary Data Analysis", "Web Scraping"] if url_sources
        else ["Secondary Data Analysis"],
        "rai:dataCollectionTimeframe": manifest.data.get("created_at", ""),
        "rai:dataCollectionRawData": "; ".join(f"{e.name}: {', '.join(e.metadata)}" for e in built_sources(manifest)),
        "rai:dataCollectionMissingData": (
            f"{totals.get('failures', 0):,} of {totals.get('input_rows', 0):,} candidate rows did not become pairs "
            f"and {totals.get('rejects', 0):,} were rejected at ingest; every one is recorded with its reason "
            f"(the failures record set; ingest rejects in the build's work state). Failures by reason: "
            f"{_reasons(manifest) or 'none'}."),
        "rai:dataPreprocessingProtocol": [
            "Caption cleaning (whitespace and control characters) and length limits per source; a caption over "
            "the limit is rejected, never truncated.",
            "Language identification with fastText lid.176 for YFCC100M (English kept); WIT: the English "
            "reference/attribution/alt-text rule of PMD.",
            f"Images decoded once, checked (minimum side, aspect ratio, pixel count), resized to "
            f"{config.get('image', {}).get('image_size', '?')} px on the shorter side and re-encoded as JPEG.",
            "Exact deduplication: the first of each (image sha256, caption) pair is kept, the others are failures "
            "with reason `duplicate`.",
            f"Decontamination against evaluation sets: {len(decon.get('against', []))} image set(s) by pHash "
            f"(Hamming threshold {decon.get('threshold', '?')}) and {len(decon.get('flickr_ids', []))} Flickr "
            f"id list(s); {overlap:,} pairs removed as `eval_overlap`.",
        ],
        "rai:dataLimitations": [
            "Link rot: URL sources lose images every year; a rebuild holds fewer pairs than the paper's Table 2 "
            "and the difference is in the failures record set.",
            "Placeholders: some hosts answer a removed image with a generic placeholder image; known placeholders "
            "are refused, unknown ones may remain.",
            f"Takedowns: {len(takedowns)} removal request(s) applied to this build "
            f"({sum(int(t.get('rows', 0)) for t in takedowns):,} pairs removed); later requests are applied with "
            "`pmd takedown`.",
            "Captions are upstream text (alt text, user captions, annotations) and may be wrong, biased or "
            "offensive; no content filter beyond the checks above was applied.",
        ],
        "rai:personalSensitiveInformation": (
            "Images are photographs collected from the web and from photo-sharing sites and may show identifiable "
            "people; captions and `meta` may contain user names, places and dates from the upstream metadata. No "
            "face blurring or PII removal was applied. Removal requests: `pmd takedown` (by key, URL or image "
            "digest)."),
        "rai:dataUseCases": (
            "Research on vision-language pretraining (FLAVA, CLIP-style contrastive training) and the audit of "
            "what such a corpus contains. Not for identifying people, and not for commercial use where a "
            "source's licence forbids it (the sources record set)."),
        "rai:dataBiases": (
            "English captions only; sources skew to Flickr photography (SBU, YFCC100M), Wikipedia (WIT) and web "
            "alt text (Conceptual Captions, CC12M), with their geographic and cultural skews."),
        "rai:dataSocialImpact": (
            "A public rebuild makes the corpus behind a published model auditable; the same openness lets it be "
            "reused beyond the terms of its images, which keep their owners' licences."),
        "rai:dataReleaseMaintenancePlan": (
            "The corpus is rebuilt from the upstream metadata by `pmd build`; removal requests are recorded in "
            "takedowns/ and applied in place and by every later build."),
    }


def croissant_metadata(manifest: Manifest, name: str = "pmd") -> dict:
    """The Croissant JSON-LD document of the build `manifest` describes. Nothing in it depends on where OUT is, so
    a copied or uploaded corpus keeps a current document."""
    pmd = citations()[PMD_CITATION_KEY]
    entries = built_sources(manifest)
    creators = [{"@type": "sc:Person", "name": person} for person in pmd.creators]
    totals = manifest.data.get("totals", {})
    doc = {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "name": name,
        "description": (
            f"PMD (Public Multimodal Datasets, the FLAVA paper's pretraining corpus) rebuilt from its public "
            f"sources with pmd: {totals.get('pairs', 0):,} image-text pairs from {len(entries)} source(s), "
            f"{totals.get('unique_images', 0):,} distinct images, {len(manifest.shards)} Parquet shard(s)."),
        "conformsTo": list(CONFORMS_TO),
        "url": PMD_URL,
        "version": f"{manifest.data.get('schema_version', 1)}.0.0",
        "datePublished": manifest.data.get("created_at", ""),
        "isLiveDataset": False,
        "keywords": ["image-text pairs", "vision-language pretraining", "FLAVA", "PMD"],
        "creator": creators,
        "citeAs": pmd.bibtex,
        "license": [{"@type": "sc:CreativeWork", "name": e.name, "description": e.licence} for e in entries],
        "isBasedOn": [{"@type": "sc:CreativeWork", "name": e.title, "url": e.homepage,
                       "creator": [{"@type": "sc:Person", "name": p} for p in citations()[e.name].creators],
                       "citation": citations()[e.name].bibtex} for e in entries],
        "sdVersion": manifest.data.get("code_version", ""),
        "distribution": _distribution(manifest),
        "recordSet": [_sources_record_set(entries), _pairs_record_set(),
                      *([_failures_record_set()] if manifest.failures else [])],
    }
    doc.update(rai_fields(manifest))
    return doc
