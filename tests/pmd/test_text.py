import hashlib

from pmd.text import (LanguageIdentifier, bundled_lid_model_path, clean_caption, clean_flickr_text,
                      collapse_whitespace, word_count)


def test_bundled_model_is_the_canonical_lid176_ftz():
    path = bundled_lid_model_path()
    assert path.stat().st_size == 938_013
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("8f3472cf")


def test_language_identifier():
    lid = LanguageIdentifier()
    assert lid.identify("A dog playing in the snow near the lake").lang == "en"
    assert lid.identify("Ein Hund spielt im Schnee am See").lang == "de"
    # Newlines would break fastText's single-line predict: they are flattened first.
    assert lid.identify("A dog\nplaying in\nthe snow").lang == "en"
    # Mostly upper-case text is lower-cased before prediction.
    assert lid.identify("SUNSET OVER THE HARBOUR TONIGHT").lang == "en"
    result = lid.identify("")
    assert 0.0 <= result.score <= 1.0


def test_cleaning():
    assert collapse_whitespace("  a\t b\n\nc  ") == "a b c"
    assert clean_caption("A man on a moped. ") == "A man on a moped."
    assert clean_flickr_text("Caf%C3%A9+au+lait%0A%0Aat+%3Cb%3Enoon%3C%2Fb%3E") == "Café au lait at noon"
    assert clean_flickr_text("see+https%3A%2F%2Fflickr.com%2Fx+now") == "see now"
    assert clean_flickr_text("Tom+%26amp%3B+Jerry") == "Tom & Jerry"
    assert clean_flickr_text("%ZZbroken+escape") == "%ZZbroken escape"
    assert word_count("  two   words ") == 2 and word_count("") == 0
