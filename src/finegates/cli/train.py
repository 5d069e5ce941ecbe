"""`finegates train`: classification or language modelling, over `TrainConfig` / `LMConfig`.

Each option is a field of those configs (tests/test_cli_config.py checks names and defaults);
the options that are not one-to-one (`--opt`, `--prune-units`, `--weight-lr`, `--objective`) are
translated here, and nothing else is decided here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..training.config import LMConfig, TrainConfig
from .app import OVERWRITE_HELP, _quiet_transformers, app, fail, option, run_guarded, split_list


METHOD_OPTIONS_HELP = (
    "Method option KEY=VALUE, repeatable (defaults shown). "
    "lora: r=8 alpha=16 dropout=0.1 targets=q,v (roles or module names); "
    "pst: rank=8 mask_rank=8 beta=1 alpha1=1 alpha2=1 start=0.1 end=0.7 (fractions of the steps); "
    "gmp: start=0 end=0.7 freq=0 (0: 20 mask updates) scope=layer|global distill_weight=1; "
    "magnitude: allocation=uniform|global; gates, full: distill_weight=1."
)


def _columns(repeated: Optional[list[str]], joined: Optional[str]) -> tuple[str, ...]:
    """--text-column NAME (repeatable, taken verbatim: names may hold commas) or --text-columns a,b."""
    if repeated and joined:
        fail("give --text-column (repeatable) or --text-columns, not both")
    return tuple(repeated) if repeated else split_list(joined)


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


@app.command()
def train(
    out: Optional[Path] = option(TrainConfig, "out", "--out", default=None),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue an interrupted run from its checkpoint (its config.json; other options ignored)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    task: Optional[str] = option(TrainConfig, "task"),
    data_dir: Optional[Path] = option(TrainConfig, "data_dir"),
    model: Optional[str] = option(TrainConfig, "model"),
    train_file: Optional[Path] = option(TrainConfig, "train_file"),
    eval_file: Optional[Path] = option(TrainConfig, "eval_file"),
    text_columns: Optional[str] = option(TrainConfig, "text_columns", default=None),
    text_column: Optional[list[str]] = typer.Option(
        None, "--text-column", help="Own data: one text column, repeatable; the name is taken as is (commas, spaces)."),
    label_column: str = option(TrainConfig, "label_column"),
    regression: bool = option(TrainConfig, "regression"),
    method: str = option(TrainConfig, "method"),
    opt: Optional[list[str]] = typer.Option(None, "--opt", metavar="KEY=VALUE", help=METHOD_OPTIONS_HELP),
    prune_units: Optional[str] = typer.Option(
        None, help="Which units the fast recipe may close, comma-separated: mlp (MLP units), vo (V/O head dims), "
        "qk (Q/K dims or RoPE pairs). Default: mlp, which turns parameters into CPU time best (the only "
        "choice of the finetune recipe)."
    ),
    pooling: str = option(TrainConfig, "pooling"),
    distill: Optional[str] = option(TrainConfig, "distill"),
    recipe: Optional[str] = option(TrainConfig, "recipe", default=None),
    sparsity: Optional[float] = option(TrainConfig, "sparsity", default=None),
    epochs: float = option(TrainConfig, "epochs"),
    max_steps: Optional[int] = option(TrainConfig, "max_steps"),
    batch_size: int = option(TrainConfig, "batch_size"),
    max_length: int = option(TrainConfig, "max_length"),
    lr: Optional[float] = option(TrainConfig, "lr"),
    head_lr: Optional[float] = option(TrainConfig, "head_lr"),
    lam: Optional[float] = option(TrainConfig, "lam"),
    reg_start_step: Optional[int] = option(TrainConfig, "reg_start_step"),
    regularizer: Optional[str] = option(TrainConfig, "regularizer"),
    train_bias: Optional[bool] = option(TrainConfig, "train_bias", "--train-bias/--freeze-bias"),
    train_weights: Optional[bool] = option(TrainConfig, "train_weights", "--train-weights/--freeze-weights"),
    weight_lr: Optional[float] = typer.Option(None, help="Learning rate of trained weights. Default: 2e-5."),
    teacher: Optional[Path] = option(TrainConfig, "teacher"),
    kd_weight: Optional[float] = option(TrainConfig, "kd_weight", default=None),
    kd_temperature: Optional[float] = option(TrainConfig, "kd_temperature", default=None),
    seed: int = option(TrainConfig, "seed"),
    train_limit: Optional[int] = option(TrainConfig, "train_limit"),
    eval_limit: Optional[int] = option(TrainConfig, "eval_limit"),
    evals_per_epoch: int = option(TrainConfig, "evals_per_epoch"),
    device: str = option(TrainConfig, "device"),
    trace_every: int = option(TrainConfig, "trace_every"),
    checkpoint_every: int = option(TrainConfig, "checkpoint_every"),
    skip_nonfinite: bool = option(TrainConfig, "skip_nonfinite"),
    progress: bool = option(TrainConfig, "progress"),
    log_every: int = option(TrainConfig, "log_every"),
    cuda_graphs: bool = option(TrainConfig, "cuda_graphs", "--cuda-graphs/--no-cuda-graphs"),
    objective: str = typer.Option("classify", help="classify (GLUE / own data) or lm (decoders: causal-LM loss, perplexity)."),
    text_files: Optional[str] = option(LMConfig, "text_files", default=None),
    eval_text_file: Optional[Path] = option(LMConfig, "eval_text_file"),
    block_size: int = option(LMConfig, "block_size"),
    window: int = option(LMConfig, "window"),
    stride: int = option(LMConfig, "stride"),
    eval_tokens: Optional[int] = option(LMConfig, "eval_tokens"),
    eval_dense: bool = option(LMConfig, "eval_dense"),
    drop_unk: bool = option(LMConfig, "drop_unk", "--drop-unk/--keep-unk"),
) -> None:
    """Gate-finetune a model on a GLUE task or your own data, to a sparsity target.

    Example: finegates train --task mrpc --data-dir glue/MRPC --sparsity 0.4 --epochs 5 --out runs/mrpc
    """
    _quiet_transformers()
    from ..training.classify import train as run_train
    from ..training.config import LMConfig, TrainConfig, config_from_run
    from ..training.lm import train_lm

    if resume is not None:
        resumed = run_guarded(config_from_run, resume)
        if isinstance(resumed, LMConfig):
            _print_lm_result(run_guarded(train_lm, resumed, resume=True))
        else:
            _print_result(run_guarded(run_train, resumed, resume=True))
        return
    columns = _columns(text_column, text_columns)
    if out is None:
        fail("give --out RUN_DIR (or --resume RUN_DIR to continue an interrupted run)")
    from ..training.recipes import DEFAULT_RECIPE

    chosen = recipe or ("paper-lm" if objective == "lm" else DEFAULT_RECIPE)
    if weight_lr is not None and not _trains_weights(chosen, train_weights):
        fail(f"--weight-lr needs trained weights (--train-weights): recipe {chosen!r} keeps the gated layers' "
             "weights frozen")
    if objective == "lm":
        if task or data_dir or train_file or eval_file:
            fail("--objective lm takes --text-files and --eval-text-file, not --task/--data-dir/--train-file")
        if teacher is not None:
            fail("--teacher distils a classifier's logits: it works with --objective classify only")
        lm_cfg = run_guarded(
            LMConfig, out=out, model=model or "smollm2", text_files=split_list(text_files), eval_text_file=eval_text_file,
            block_size=block_size, window=window, stride=stride, eval_tokens=eval_tokens, eval_dense=eval_dense,
            method=method, recipe=chosen, sparsity=0.3 if sparsity is None else sparsity,
            epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, head_lr=head_lr, lam=lam,
            reg_start_step=reg_start_step, regularizer=regularizer, train_bias=train_bias, seed=seed,
            evals=max(1, round(evals_per_epoch * epochs)), device=device, trace_every=trace_every, progress=progress,
            log_every=log_every, cuda_graphs=cuda_graphs,
            checkpoint_every=checkpoint_every, skip_nonfinite=skip_nonfinite,
            method_options=_options(opt), distill=distill, train_weights=train_weights,
            recipe_options=_recipe_options(None, weight_lr),
            drop_unk=drop_unk, **_given(kd_weight=kd_weight, kd_temperature=kd_temperature),
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
        progress=progress, log_every=log_every, cuda_graphs=cuda_graphs, method_options=_options(opt), distill=distill,
        pooling=pooling,
        recipe_options=_recipe_options(prune_units, weight_lr), train_weights=train_weights,
        teacher=str(teacher) if teacher is not None else None,
        **_given(kd_weight=kd_weight, kd_temperature=kd_temperature),
    )
    result = run_guarded(run_train, cfg, overwrite=overwrite)
    _print_result(result)


def _given(**options) -> dict:
    """The options given on the command line (not None): their defaults differ per objective, so an
    option left out takes its config's default (classification distils a teacher at w 0.5, T 2;
    language modelling the dense model at the recipe's weight, T 1)."""
    return {k: v for k, v in options.items() if v is not None}


def _trains_weights(recipe: str, flag: bool | None) -> bool:
    """Whether a run trains the gated layers' weights: --train-weights/--freeze-weights, else the recipe."""
    from ..training.recipes import RECIPES, get_recipe

    if flag is not None or recipe not in RECIPES:  # an unknown recipe fails later, with the recipe list
        return bool(flag)
    return get_recipe(recipe).gate.train_weights


def _recipe_options(prune_units: str | None, weight_lr: float | None) -> dict:
    """The `train` options that override a field of the recipe (recipes.py), as dotted paths."""
    options = {"reg.units": split_list(prune_units)} if prune_units else {}
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
            f"the run ({result['steps']} steps) was too short for its recipe's schedule to close the gates that far: "
            f"train more epochs (or more --max-steps).")


