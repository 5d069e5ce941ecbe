"""benchmarks/int8.py keeps one results file for several models: re-running one keeps the others."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.int8 import merged  # noqa: E402


def _rows(model: str, score: float) -> list[dict]:
    return [{"model": model, "task": "rte", "variant": v, "latency_ms": 1.0, "score": score}
            for v in ("dense-fp32-torch", "compressed-int8-onnx")]


def test_rerunning_one_model_replaces_its_rows_and_keeps_the_others(tmp_path):
    path = tmp_path / "int8.json"
    assert merged(path, "a", {"commit": "1"}, _rows("a", 70.0)) == ({"a": {"commit": "1"}}, _rows("a", 70.0))
    path.write_text(json.dumps({"meta": {"benchmark": "x", "models": {"a": {"commit": "1"}, "b": {"commit": "2"}}},
                                "runs": _rows("a", 70.0) + _rows("b", 80.0)}))
    models, rows = merged(path, "a", {"commit": "3"}, _rows("a", 71.0))
    assert models == {"b": {"commit": "2"}, "a": {"commit": "3"}}
    assert rows == _rows("b", 80.0) + _rows("a", 71.0)


def test_the_earlier_one_model_format_is_carried_over(tmp_path):
    path = tmp_path / "int8.json"
    path.write_text(json.dumps({"meta": {"commit": "1"}, "runs": _rows("MiniLM", 79.0)}))
    models, rows = merged(path, "MPNet", {"commit": "2"}, _rows("MPNet", 60.0))
    assert models == {"MiniLM": {"commit": "1"}, "MPNet": {"commit": "2"}}
    assert rows == _rows("MiniLM", 79.0) + _rows("MPNet", 60.0)
