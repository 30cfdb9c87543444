"""The `pmd` and `flava` commands: the top floor, the only code that imports the library (pmd), the executors
(pipelines), the demo (pmd_demo) and the trainer (flava) together. Each command is a thin wrapper: it parses its
arguments (choices and defaults from the config dataclasses), calls one library function and prints its result.

- `pmd_cli.pmd`: `pmd` (sources, ingest, build, verify, card, stats, takedown, export, fetch-metadata, demo);
- `pmd_cli.stats`: `pmd stats`;
- `pmd_cli.flava`: `flava` (train, eval, export, ...); `torchrun ... -m pmd_cli.flava train ...` for several
  processes.
"""
