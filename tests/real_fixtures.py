"""Where the real upstream rows live: inside the repository, so a clone anywhere runs the tests (see
tests/fixtures/real/README.md for each file's provenance)."""
from pathlib import Path

REAL = Path(__file__).parent / "fixtures" / "real"
