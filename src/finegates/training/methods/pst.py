"""PST (Li et al., IJCAI 2022, "Parameter-Efficient Sparsity for Large Language Models Fine-Tuning").

Each linear layer of the transformer blocks keeps its frozen weight W and gets
  a LoRA-style update        W' = W + beta * U V                       (U: out x r, V: r x in)
  a cheap importance score   S  = |W'| + alpha1 * A B + alpha2 * (R 1^T + 1 C^T)
                                  (data-free |W'|, data-driven low-rank A B + row/column vectors R, C)
  an unstructured mask       M  = 0 on the int(s * numel) lowest S, 1 elsewhere
and computes y = (M * W') x + b. The mask passes gradients straight through to S, so A, B, R, C
learn which weights to drop. s rises on a cubic schedule to the target `--sparsity`. Trainable:
U, V, A, B, R, C and the task head. Initialisation as the authors' released code (U, A ~ N(0, 1);
V, B, R, C = 0), which starts from the pretrained weights and S = |W|.

Unstructured sparsity does not shrink any matrix: it needs sparse kernels to run faster, which
dense CPU inference does not use. The run reports the sparsity it reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..schedules import cubic_sparsity
from .baseline import Baseline, block_linears, freeze, head_group, set_submodule, smallest_mask
from .registry import register


@dataclass
class PSTOptions:
    rank: int = field(default=8, metadata={"help": "Rank of the weight update U V."})
    mask_rank: int = field(default=8, metadata={"help": "Rank of the data-driven importance A B."})
    beta: float = field(default=1.0, metadata={"help": "Scale of the weight update."})
    alpha1: float = field(default=1.0, metadata={"help": "Scale of the low-rank importance A B."})
    alpha2: float = field(default=1.0, metadata={"help": "Scale of the row/column importance R, C."})
    start: float = field(default=0.1, metadata={"help": "Fraction of steps before pruning starts."})
    end: float = field(default=0.7, metadata={"help": "Fraction of steps at which the target sparsity is reached."})

    def __post_init__(self) -> None:
        if self.rank <= 0 or self.mask_rank <= 0:
            raise ValueError("pst: rank and mask_rank must be positive")
        if not (0.0 <= self.start < self.end <= 1.0):
            raise ValueError(f"pst: need 0 <= start < end <= 1, got start={self.start} end={self.end}")


class _StraightThrough(torch.autograd.Function):
    """Top-k mask forward, identity backward (the gradient w.r.t. the mask goes to the scores)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        return smallest_mask(scores, sparsity)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class PSTLinear(nn.Module):
    """A frozen linear layer with PST's weight update and learned unstructured mask."""

    def __init__(self, base: nn.Linear, o: PSTOptions) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        out_f, in_f = base.weight.shape
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.beta, self.alpha1, self.alpha2 = o.beta, o.alpha1, o.alpha2
        self.weight_U = nn.Parameter(torch.randn(out_f, o.rank, **kw))
        self.weight_V = nn.Parameter(torch.zeros(o.rank, in_f, **kw))
        self.mask_A = nn.Parameter(torch.randn(out_f, o.mask_rank, **kw))
        self.mask_B = nn.Parameter(torch.zeros(o.mask_rank, in_f, **kw))
        self.mask_R = nn.Parameter(torch.zeros(out_f, **kw))
        self.mask_C = nn.Parameter(torch.zeros(in_f, **kw))
        self.sparsity = 0.0

    def weight_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.base.weight.float() + self.beta * self.weight_U @ self.weight_V
        scores = (w.abs() + self.alpha1 * self.mask_A @ self.mask_B
                  + self.alpha2 * (self.mask_R[:, None] + self.mask_C[None, :]))
        return w, _StraightThrough.apply(scores, self.sparsity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, m = self.weight_and_mask()
        return F.linear(x, (w * m).to(x.dtype), self.base.bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w, m = self.weight_and_mask()
        return (w * m).to(self.base.weight.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.copy_(self.merged_weight())
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        out.requires_grad_(False)
        return out

    @property
    def weight(self) -> torch.Tensor:  # HF code sometimes reads `.weight.dtype` of projections
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


@register
class PSTMethod(Baseline):
    """PST with the authors' released GLUE defaults (alibaba/AliceMind S4/PST): rank 8 weight update,
    rank 8 importance, alpha1 = alpha2 = beta = 1, sparsity 0 for the first 10% of the steps, cubic
    to the target by 70%, held for the last 30%, lr 3e-5 (their BERT-base script; constant here,
    linear decay there). Their optimizer holds only the PST tensors; ours also trains the task head
    (same lr), as every method here does. Unstructured sparsity `--sparsity` in every block linear
    layer. (An earlier default of lr 1e-3 left SST-2 at the majority class in a 150-step CPU test;
    the cause was not measured.)"""

    name = "pst"
    Options = PSTOptions
    default_lr = 3e-5

    def __init__(self) -> None:
        super().__init__()
        self.layers: dict[str, PSTLinear] = {}
        self.total_steps = 1

    def setup(self, model, cfg, total_steps):
        freeze(model)
        self.total_steps = total_steps
        for name, lin in block_linears(model):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"pst: {name} is {type(lin).__name__}, not nn.Linear")
            layer = PSTLinear(lin, self.opts)
            set_submodule(model, name, layer)
            self.layers[name] = layer
        self._set_sparsity(0)
        pst = [p for m in self.layers.values() for n, p in m.named_parameters() if not n.startswith("base.")]
        return [{"params": pst, "lr": self.lr, "name": "pst"}, head_group(model, self.head_lr)]

    def schedule(self, step: int) -> float:
        return cubic_sparsity(step, self.total_steps, self.sparsity, self.opts.start, self.opts.end)

    def _set_sparsity(self, step: int) -> None:
        s = self.schedule(step)
        for m in self.layers.values():
            m.sparsity = s

    def after_step(self, model, step):
        self._set_sparsity(step + 1)  # the sparsity of the next step (and of evaluations after this one)

    def state(self) -> dict:
        return {"sparsity": self.current_sparsity()}

    def load_state(self, state: dict) -> None:
        for m in self.layers.values():
            m.sparsity = float(state["sparsity"])

    def current_sparsity(self) -> float:
        return next(iter(self.layers.values())).sparsity if self.layers else 0.0

    @torch.no_grad()
    def achieved_sparsity(self) -> float:
        zeros = total = 0
        for m in self.layers.values():
            w = m.merged_weight()
            zeros += int((w == 0).sum())
            total += w.numel()
        return zeros / max(total, 1)

    def progress(self):
        return {"sparsity": f"{self.current_sparsity():.2f}"}

    @torch.no_grad()
    def trainable_state(self, model):
        """Masked merged weights of every PST layer + the head, under the plain HF names."""
        out = {f"{n}.weight": m.merged_weight().cpu().clone() for n, m in self.layers.items()}
        pst_ids = {id(p) for m in self.layers.values() for p in m.parameters()}
        out.update({n: p.detach().cpu().clone() for n, p in model.named_parameters()
                    if p.requires_grad and id(p) not in pst_ids})
        return out

    def finish(self, model):
        super().finish(model)
        for name, m in self.layers.items():
            set_submodule(model, name, m.merged())
        self.merged_sparsity = self.achieved_sparsity()

    def summary(self, model):
        s = getattr(self, "merged_sparsity", None)
        return {"target_sparsity": self.sparsity,
                "unstructured_sparsity": s if s is not None else self.achieved_sparsity(),
                "sparsity_scope": "weights of the transformer blocks' linear layers (unstructured: no dense speed-up)"}
