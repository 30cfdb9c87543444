import pyarrow as pa

from pmd import schema


def test_pair_schema_has_the_published_loader_fields_and_a_version():
    for name in ("text", "image_url", "source", "meta"):
        assert name in schema.PAIR_SCHEMA.names
    assert schema.PAIR_COLUMNS == ("key", "source", "text", "image_url", "image_ref", "split", "meta", "lang",
                                   "lang_score")
    assert schema.schema_version(schema.PAIR_SCHEMA) == schema.SCHEMA_VERSION == 1
    assert schema.schema_version(pa.schema([pa.field("x", pa.int8())])) is None
    assert not schema.PAIR_SCHEMA.field("key").nullable and schema.PAIR_SCHEMA.field("image_url").nullable
    assert schema.PAIR_SCHEMA.field("lang_score").type == pa.float32()


def test_a_candidate_is_a_pair_plus_its_crop():
    assert schema.CANDIDATE_SCHEMA.names == [*schema.PAIR_COLUMNS, "crop"]
    crop = schema.CANDIDATE_SCHEMA.field("crop")
    assert crop.nullable and crop.type == pa.struct([("x", pa.int32()), ("y", pa.int32()), ("width", pa.int32()),
                                                     ("height", pa.int32())])
    assert schema.SHARD_SCHEMA.names[:len(schema.PAIR_COLUMNS)] == list(schema.PAIR_COLUMNS)
    assert "crop" not in schema.SHARD_SCHEMA.names


def test_source_names_match_the_published_loader():
    assert len(schema.SOURCE_NAMES) == 12 and len(set(schema.SOURCE_NAMES)) == 12
    assert "localized_narratives__ADE20k" in schema.SOURCE_NAMES and "red_caps" in schema.SOURCE_NAMES
