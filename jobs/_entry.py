"""Shared body of the stage entrypoints: run one ``catkd`` subcommand and exit with its status.

Each ``jobs/<stage>.py`` runs unchanged locally (``python -m jobs.shard ...``) and as a
Ray job (``ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml --
python -m jobs.shard ...``): inside a job, ``RAY_ADDRESS`` points at the cluster and the
stage connects to it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def run(subcommand: Sequence[str], argv: Sequence[str] | None = None) -> None:
    from pipeline.cli import main

    sys.exit(main([*subcommand, *(sys.argv[1:] if argv is None else argv)]))
