"""Tiny random models of every family and gate patterns, shared by the compression tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification,
    LlamaConfig, LlamaForSequenceClassification, MistralConfig, MistralForSequenceClassification,
    MPNetConfig, MPNetForSequenceClassification,
    Qwen2Config, Qwen2ForSequenceClassification, RobertaConfig, RobertaForSequenceClassification,
)

from finegates import GateConfig, GateParam, apply_gates
from finegates.core.arch import blocks, spec_for

# The start of a script run in a fresh interpreter where `import finegates` raises (a blocking finder
# on sys.meta_path covers the editable install as well as PYTHONPATH): what loads a compressed folder
# after it runs, loads it without finegates (trust_remote_code).
WITHOUT_FINEGATES = r'''
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "finegates":
            raise ImportError("finegates is blocked in this test")
sys.meta_path.insert(0, Block())
'''

_ENC = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, num_labels=3)
_DEC = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=64, num_labels=3, pad_token_id=0)

FAMILIES = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**_ENC)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(**_ENC, pad_token_id=1)),
    "distilbert": lambda: DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=32, n_layers=3, n_heads=4, hidden_dim=48, max_position_embeddings=64, num_labels=3)),
    "mpnet": lambda: MPNetForSequenceClassification(MPNetConfig(**_ENC, pad_token_id=1)),
    "llama": lambda: LlamaForSequenceClassification(LlamaConfig(**_DEC)),
    "qwen2": lambda: Qwen2ForSequenceClassification(Qwen2Config(**_DEC)),
    "mistral": lambda: MistralForSequenceClassification(MistralConfig(**_DEC, head_dim=8)),
}

PARAM = GateParam(mean_fn="identity", init_mean=0.5, init_std=0.0, noise_std=0.0)


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # non-trivial biases and norms, so folding and scaling mistakes show
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n.lower():
                p.add_(0.1 * torch.randn_like(p))
            if "relative_attention_bias" in n:  # MPNet's per-head position bias: large, so dropping it shows
                p.normal_(0.0, 2.0)
    return model


def gated(family: str, pattern: str = "random", seed: int = 0):
    """A tiny gated model whose gates follow `pattern` (random values + hand-made edge cases)."""
    model = apply_gates(tiny(family, seed), GateConfig(param=PARAM))
    set_gates(model, pattern, seed)
    return model.eval()


def _theta(n: int, gen: torch.Generator, p_closed: float = 0.3, p_frac: float = 0.3) -> torch.Tensor:
    """Gate values: closed (theta -1), fractional (0 < z < 1), or fully open."""
    u = torch.rand(n, generator=gen)
    frac = torch.rand(n, generator=gen) - 0.45  # z = theta + 0.5 in (0.05, 1.05)
    return torch.where(u < p_closed, torch.full((n,), -1.0), torch.where(u < p_closed + p_frac, frac, torch.full((n,), 0.5)))


@torch.no_grad()
def set_gates(model, pattern: str, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    spec = spec_for(model)
    for m in model.modules():
        for g in getattr(m, "gates", lambda: {})().values():
            g.theta.copy_(_theta(g.theta.numel(), gen, p_closed=0.3 if pattern == "random" else 0.15))
    if pattern == "random":
        return
    from finegates.core.arch import head_counts

    n_heads, n_kv, D = head_counts(model.config, spec)
    layer = blocks(model, spec)
    role = lambda i, r: layer[i].get_submodule(spec.modules[r])  # noqa: E731
    # layer 0: head 0 closed through O, half a RoPE pair in head 1, kv group 1 partly closed
    role(0, "o").col_gate.theta[:D] = -1.0
    role(0, "q").row_gate.theta[D:2 * D] = 0.5
    role(0, "q").row_gate.theta[D + 1] = -1.0  # dim 1 closed, dim 1 + D/2 open
    role(0, "k").row_gate.theta[(n_kv - 1) * D:(n_kv - 1) * D + D // 2] = -1.0
    # layer 1: whole attention closed (every V row) and whole MLP closed (every down column)
    role(1, "v").row_gate.theta[:] = -1.0
    role(1, "down").col_gate.theta[:] = -1.0
    # layer 2: every Q row closed (uniform attention, heads stay), MLP through up rows only
    role(2, "q").row_gate.theta[:] = -1.0
    role(2, "up").row_gate.theta[::2] = -1.0


def inputs(seed: int = 0, batch: int = 3, seq: int = 11) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[min(1, batch - 1), seq - 4:] = 0  # one padded sequence
    ids[min(1, batch - 1), seq - 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}
