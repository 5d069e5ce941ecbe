"""The SmolLM2 LM table: the adapted-dense control gets its own column."""

from benchmarks.smollm2_report import _markdown


def _row(name, ppl, target=0.0, recipe=None):
    bench = {"prefill_ms": {"median": 100.0}, "decode_ms_per_token": {"median": 50.0}}
    return {"name": name, "kind": recipe or "dense", "recipe": recipe, "target": target, "perplexity": ppl,
            "layer_params_removed_fraction": target, "params": 1e8, "bench": bench}


META = {"bench": {"prompt_tokens": 8, "new_tokens": 4, "threads": 2, "runs": 1}, "eval_text": "test",
        "window": 512, "stride": 256, "eval_precision": "fp32", "gpu_run": {"device": "GPU"}, "calib_blocks": 4,
        "machine": {"cpu": "cpu", "load_average": (0.0, 0.0, 0.0)}, "commit": "abc"}


def _line(md: str, name: str) -> list[str]:
    return next(line for line in md.splitlines() if line.startswith(f"| {name} |")).split(" | ")


def test_gate_rows_are_compared_with_the_adapted_dense_control():
    rows = [_row("dense", 20.0), _row("ctl", 16.0, 0.0, "lm-distill"), _row("cut", 20.0, 0.2, "lm-distill"),
            _row("wanda", 40.0, 0.2)]
    md = _markdown(META, rows, 20.0)
    assert _line(md, "cut")[2:4] == ["+0.0%", "+25.0%"]  # vs dense, vs adapted dense
    assert _line(md, "ctl")[3] == "-" and _line(md, "wanda")[3] == "-" and _line(md, "dense")[3] == "-"
    assert "Adapted dense: `ctl`" in md


def test_without_a_control_the_column_is_empty():
    md = _markdown(META, [_row("dense", 20.0), _row("cut", 22.0, 0.2, "lm-distill")], 20.0)
    assert _line(md, "cut")[3] == "-" and "Adapted dense" not in md
