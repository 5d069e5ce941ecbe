"""What every benchmark writes: a JSON with its rows and provenance, and a Markdown table beside it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The commit the results were reported from ('' outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def write_results(json_path, meta: dict, rows: list[dict], markdown: str) -> None:
    """JSON_PATH gets {"meta", "runs"}; the same name with .md gets `markdown`."""
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
