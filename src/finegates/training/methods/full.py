"""Full finetuning: every weight trains. The reference every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...core.model import head_parameters
from .baseline import Baseline, requires_grad_state
from .registry import register


@dataclass
class FullOptions:
    distill_weight: float = field(default=1.0, metadata={"help": "Weight of the SquareHead loss (with --distill squarehead)."})


@register
class FullMethod(Baseline):
    """Every parameter trains with AdamW at lr 2e-5 (BERT/RoBERTa GLUE practice, Devlin et al. 2019),
    the task head at the same lr unless --head-lr is given. `--distill squarehead` adds feature
    distillation from the pretrained model (off by default)."""

    name = "full"
    graphable = True
    Options = FullOptions
    default_lr = 2e-5
    distills = True

    def setup(self, model, cfg, total_steps):
        head_ids = {id(p) for p in head_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(True)
        head = [p for p in model.parameters() if id(p) in head_ids]
        body = [p for p in model.parameters() if id(p) not in head_ids]
        return [{"params": body, "lr": self.lr, "name": "weights"}, {"params": head, "lr": self.head_lr, "name": "head"}]

    def trainable_state(self, model):
        return requires_grad_state(model)
