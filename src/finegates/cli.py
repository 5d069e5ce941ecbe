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


def _split(value: Optional[str]) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Run directory to write (config, metrics, trained gates)."),
    task: Optional[str] = typer.Option(None, help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli."),
    data_dir: Optional[Path] = typer.Option(None, help="GLUE task folder holding train.tsv and dev.tsv."),
    model: Optional[str] = typer.Option(None, help="HF model folder or hub id. Default: the embedded MiniLM-L6."),
    train_file: Optional[Path] = typer.Option(None, help="Own data: training file (.csv, .tsv, .jsonl)."),
    eval_file: Optional[Path] = typer.Option(None, help="Own data: evaluation file."),
    text_columns: Optional[str] = typer.Option(None, help="Own data: text column(s), comma-separated (1 or 2)."),
    label_column: str = typer.Option("label", help="Own data: label column."),
    regression: bool = typer.Option(False, help="Own data: the label is a number (regression)."),
    method: str = typer.Option("gates", help="Training method (gates, or a baseline)."),
    recipe: str = typer.Option("fast", help="Gate recipe: fast (ours, default), paper (published code), stg."),
    sparsity: float = typer.Option(0.4, help="Target fraction of transformer-layer parameters to remove, in [0, 1)."),
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
    seed: int = typer.Option(0, help="Random seed."),
    train_limit: Optional[int] = typer.Option(None, help="Use only the first N training examples."),
    eval_limit: Optional[int] = typer.Option(None, help="Use only the first N evaluation examples."),
    evals_per_epoch: int = typer.Option(1, help="Evaluations per epoch."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    trace_every: int = typer.Option(0, help="Log gate internals to trace.jsonl every N steps (0: off)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Gate-finetune a model on a GLUE task or your own data, to a sparsity target.

    Example: finegates train --task mrpc --data-dir glue/MRPC --sparsity 0.4 --epochs 5 --out runs/mrpc
    """
    _quiet_transformers()
    from .train import TrainConfig, train as run_train

    cfg = run_guarded(
        TrainConfig, out=out, model=model, task=task, data_dir=data_dir, train_file=train_file,
        eval_file=eval_file, text_columns=_split(text_columns), label_column=label_column,
        regression=regression, method=method, recipe=recipe, sparsity=sparsity, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, max_length=max_length, lr=lr, head_lr=head_lr,
        lam=lam, reg_start_step=reg_start_step, regularizer=regularizer, train_bias=train_bias, seed=seed,
        train_limit=train_limit, eval_limit=eval_limit, evals_per_epoch=evals_per_epoch, device=device,
        trace_every=trace_every, progress=progress,
    )
    result = run_guarded(run_train, cfg)
    _print_result(result)


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
    table.add_row("seconds / step", f"{result['seconds_per_step']:.3f}")
    Console().print(table)


@app.command()
def info(path: Path = typer.Argument(..., help="A run directory or a model folder.")) -> None:
    """Say what a run directory or a model folder contains."""
    if (path / "config.json").is_file() and (path / "trainable.safetensors").exists():
        cfg = json.loads((path / "config.json").read_text())
        metrics = path / "metrics.json"
        typer.echo(f"run directory: {cfg['train']['method']} on {cfg['task']} from {cfg['model_location']}")
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            typer.echo(json.dumps({k: v for k, v in m.items() if k != "open_fractions"}, indent=2))
        else:
            typer.echo("incomplete: no metrics.json (training did not finish)")
        return
    _quiet_transformers()
    from .models import load_config

    config = run_guarded(load_config, str(path))
    typer.echo(json.dumps(config.to_dict(), indent=2, default=str))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
