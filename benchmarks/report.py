"""What every benchmark writes: a JSON with its rows and provenance, and a Markdown table beside it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The commit the results were reported from ('' outside a git checkout). FINEGATES_COMMIT wins
    when set: the GPU machine's copy of the checkout has this session's working tree but the `.git` of
    the session's start, so a command run there names the commit it was sent from (issue 19's
    session-5 table came back labelled with the session's first commit)."""
    return os.environ.get("FINEGATES_COMMIT") or \
        subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def write_results(json_path, meta: dict, rows: list[dict], markdown: str) -> None:
    """JSON_PATH gets {"meta", "runs"}; the same name with .md gets `markdown`."""
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
