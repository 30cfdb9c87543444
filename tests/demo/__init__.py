"""Tests of pmd_demo. Not named tests/pmd_demo: tests/httpserver.py runs as a script with tests/ first on sys.path,
where a folder of that name would hide the package."""
