"""BitFit (Ben Zaken et al., 2022): only the bias terms (and the task head) train."""

from __future__ import annotations

from .baseline import Baseline, freeze, head_group, requires_grad_state
from .registry import register


@register
class BitFitMethod(Baseline):
    """Every bias of the model (attention, MLP, LayerNorm, embeddings LayerNorm) plus the task head
    trains; all weight matrices stay frozen. lr 1e-3 for both: the BitFit paper searched
    {1e-4, 4e-4, 7e-4, 1e-3} on GLUE with BERT; 1e-3 is its usual pick for small tasks."""

    name = "bitfit"
    graphable = True
    default_lr = 1e-3

    def setup(self, model, cfg, total_steps):
        freeze(model)
        head = head_group(model, self.head_lr)
        head_ids = {id(p) for p in head["params"]}
        biases = [p for n, p in model.named_parameters() if n.endswith("bias") and id(p) not in head_ids]
        for p in biases:
            p.requires_grad_(True)
        return [{"params": biases, "lr": self.lr, "name": "biases"}, head]

    def trainable_state(self, model):
        return requires_grad_state(model)
