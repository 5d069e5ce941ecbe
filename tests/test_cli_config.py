"""The CLI is a thin layer over the config dataclasses: every option of `train`, `pretrain` and
`bench` is a field of the config it fills (its help and default read from the field by
`cli.app.option`), under the same name and with the same default unless the command decides it per
objective; every field has help text. An option added to one side only fails here."""

from dataclasses import MISSING, fields

import pytest
import typer

from finegates.bench.latency import BenchConfig
from finegates.cli import app
from finegates.training.config import LMConfig, RunConfig, TrainConfig
from finegates.training.pretrain import PretrainConfig

COMMANDS = {c.name: c for c in typer.main.get_command(app).commands.values()}

# options that are not one field: translated by the command (cli/train.py, cli/commands.py)
TRANSLATED = {
    "train": {"resume", "overwrite", "opt", "prune_units", "weight_lr", "objective", "text_column"},
    "pretrain": {"resume", "overwrite", "config"},
    "bench": {"model_dir", "against", "json_out"},
}
# defaults the command decides per objective (None on the command line): recipe, sparsity, model, KD
PER_OBJECTIVE = {"model", "recipe", "sparsity", "kd_weight", "kd_temperature"}


def _default(cls, name):
    f = {f.name: f for f in fields(cls)}[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _options(command: str) -> dict:
    return {p.name: p for p in COMMANDS[command].params}


@pytest.mark.parametrize("command, configs", [
    ("train", (TrainConfig, LMConfig)), ("pretrain", (PretrainConfig,)), ("bench", (BenchConfig,))])
def test_every_option_is_a_config_field_with_its_default(command, configs):
    for name, param in _options(command).items():
        if name in TRANSLATED[command]:
            continue
        owners = [c for c in configs if name in {f.name for f in fields(c)}]
        assert owners, f"finegates {command} --{name.replace('_', '-')}: no field of {[c.__name__ for c in configs]}"
        # a field shared by both train objectives takes the classification default (RunConfig's)
        owner = TrainConfig if command == "train" and name in {f.name for f in fields(RunConfig)} else owners[0]
        if name in PER_OBJECTIVE and param.default is None:
            continue
        default = _default(owner, name)
        if default is MISSING:  # a required field (--out): the command checks it is given
            continue
        cli = param.default
        if isinstance(default, tuple):  # comma-separated on the command line
            cli = tuple(cli.split(",")) if cli else ()
        assert cli == default or (default is None and cli is None), (command, name, cli, default)


@pytest.mark.parametrize("config", [TrainConfig, LMConfig, PretrainConfig, BenchConfig])
def test_every_config_field_has_help(config):
    for f in fields(config):
        assert f.metadata.get("help"), f"{config.__name__}.{f.name} has no help text"


def test_a_field_missing_from_the_config_is_caught():
    """The check can fail: against a config without bench's fields it names the option."""
    with pytest.raises(AssertionError, match="--threads"):
        test_every_option_is_a_config_field_with_its_default("bench", (PretrainConfig,))
