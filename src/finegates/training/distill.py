"""SquareHead feature distillation (Kurtic et al., 2023) from the dense model before training.

    L_feat = sum_l MSE(f_l^student, f_l^teacher) / MSE(f_l^teacher, 0)

f_l is the output hidden state of transformer block l. Dividing by the teacher's mean square
makes every layer count the same whatever its activation scale. Padding positions are left out
of both means *(ours: the paper does not say; padded positions carry no task signal)*.

Block outputs are read with forward hooks on the blocks (`arch.blocks`), so neither the training
loop nor the model's forward has to ask for `output_hidden_states`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..core.arch import blocks

DISTILL_KINDS = ("none", "squarehead")


class BlockOutputs:
    """Forward hooks that keep the latest output hidden state of every block of a model."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = [
            block.register_forward_hook(self._hook(i)) for i, block in enumerate(blocks(model))
        ]

    def _hook(self, i: int):
        def store(module, args, output):
            self.outputs[i] = output[0] if isinstance(output, (tuple, list)) else output

        return store

    def take(self) -> list[torch.Tensor]:
        """The stored outputs in block order; clears them (each forward is read once)."""
        out = [self.outputs[i] for i in sorted(self.outputs)]
        self.outputs = {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def squarehead_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over layers of MSE(student, teacher) / MSE(teacher, 0); `mask` (batch, seq) marks real tokens."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"squarehead: {len(student)} student vs {len(teacher)} teacher layers")
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float().detach()
        if mask is not None:
            w = mask.to(s.dtype)[..., None]
            denom = w.sum().clamp_min(1.0) * s.shape[-1]
            mse = ((s - t) ** 2 * w).sum() / denom
            norm = (t**2 * w).sum() / denom
        else:
            mse = ((s - t) ** 2).mean()
            norm = (t**2).mean()
        total = total + mse / norm.clamp_min(1e-12)
    return total


class SquareHead:
    """The dense teacher (a frozen copy of the model as it is now) and the student's block hooks.

    Create it *before* the method changes the model (gates, masks), so the copy is the dense model.
    """

    def __init__(self, model: nn.Module, weight: float = 1.0) -> None:
        self.weight = weight
        self.teacher = frozen_copy(model)
        self.student_out = BlockOutputs(model)
        self.teacher_out = BlockOutputs(self.teacher)

    @torch.no_grad()
    def _teacher_features(self, batch: dict) -> list[torch.Tensor]:
        device = next(iter(batch.values())).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        self.teacher(**{k: v for k, v in batch.items() if k != "labels"})
        return self.teacher_out.take()

    def loss(self, batch: dict) -> torch.Tensor:
        """weight * L_feat for the student forward that just ran on `batch`."""
        student = self.student_out.take()
        teacher = self._teacher_features(batch)
        return self.weight * squarehead_loss(student, teacher, batch.get("attention_mask"))

    def remove(self) -> None:
        self.student_out.remove()
        self.teacher_out.remove()


def frozen_copy(model: nn.Module) -> nn.Module:
    """The model as it is now, as a teacher: a deep copy in eval mode that no optimizer touches.

    A copy rather than the student with its gates switched off, because a teacher must not move
    when the student's weights train (the `finetune` recipe); it costs one model's memory."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_distiller(kind: str, model: nn.Module, weight: float = 1.0) -> SquareHead | None:
    """A SquareHead distiller for `kind == "squarehead"`, None for "none"."""
    if kind not in DISTILL_KINDS:
        raise ValueError(f"--distill must be one of {', '.join(DISTILL_KINDS)}, got {kind!r}")
    return SquareHead(model, weight) if kind == "squarehead" else None


# ---- logit distillation from a finetuned teacher -------------------------------------------------
def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, regression: bool) -> torch.Tensor:
    """Hinton et al. (2015): T^2 * KL(softmax(teacher/T) || softmax(student/T)); MSE for regression.

    The T^2 factor keeps the gradient scale independent of T, so `kd_weight` means the same at any T.
    """
    student, teacher = student.float(), teacher.float().detach()
    if regression:
        return nn.functional.mse_loss(student.reshape(-1), teacher.reshape(-1))
    t = temperature
    log_p = nn.functional.log_softmax(student / t, dim=-1)
    q = nn.functional.softmax(teacher / t, dim=-1)
    return nn.functional.kl_div(log_p, q, reduction="batchmean") * t * t


class TeacherLogits:
    """A finetuned teacher's outputs on every training example, and the distillation loss against them.

    The teacher runs once, in eval mode (no dropout), over the training set before training starts;
    each step then looks its batch up by example index instead of running a second model. That is
    the same loss as an online eval-mode teacher at a fraction of the cost, and it leaves the GPU
    memory to the student. The table is cached in the teacher's folder (`teacher_logits/KEY.safetensors`,
    KEY from the training data, tokenizer and max length), so runs over several seeds pay it once.
    """

    def __init__(self, logits: torch.Tensor, weight: float, temperature: float, regression: bool) -> None:
        self.logits = logits
        self.weight = weight
        self.temperature = temperature
        self.regression = regression

    def mix(self, task_loss: torch.Tensor, student_logits: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, float]:
        """(1 - w) * task loss + w * KD loss for the batch of training examples `idx`; and the KD loss."""
        teacher = self.logits[idx].to(student_logits.device)
        kd = kd_loss(student_logits, teacher, self.temperature, self.regression)
        return (1.0 - self.weight) * task_loss + self.weight * kd, float(kd.detach())




def lm_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) of a causal LM's next-token distributions, averaged over every
    (sequence, position) of `[batch, seq, vocab]` logits (Hinton et al., 2015, per position).

    Both sides are log-softmaxed (`log_target`), so equal logits give exactly 0."""
    t = temperature
    vocab = student.shape[-1]
    log_p = nn.functional.log_softmax(student.float().reshape(-1, vocab) / t, dim=-1)
    log_q = nn.functional.log_softmax(teacher.float().detach().reshape(-1, vocab) / t, dim=-1)
    return nn.functional.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * t * t
