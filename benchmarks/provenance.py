"""What a benchmark result records about the code that produced it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit(root: Path | None = None) -> str:
    """The commit of the checkout at ``root`` (by default the one holding these benchmarks), with
    ``+dirty`` when the code that produces a result (the package or the benchmarks) has uncommitted
    changes; ``unknown`` outside a git checkout."""
    if os.environ.get("HF_HYPEROPT_COMMIT"):  # a benchmark run against an exported snapshot of a commit
        return os.environ["HF_HYPEROPT_COMMIT"]
    root = root or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hf_hyperopt", "benchmarks"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    if not sha:  # not a git checkout (an installed copy)
        return "unknown"
    return sha + ("+dirty" if dirty.stdout.strip() else "")
