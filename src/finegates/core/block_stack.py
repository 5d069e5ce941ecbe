"""Identical blocks counted as one: the gates of same-shaped blocks, concatenated per role.

Why: the regularizer's counts (the expected kept parameters, the hard removed fraction, the top-k
ranking, the MLP units' Taylor scores) were loops over blocks and their gates, a few kernels per gate:
hundreds per training step, which a GPU step pays in host time whether or not the GPU has work
(issue 19). A transformer's blocks are alike, so their gates stack: `coupling.keep` takes the stack
as a leading dimension and every count costs the kernels of one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .coupling import DELETABLE_SIDE, MLP_ROLES, BlockLayout, keep, kept_params, mlp_unit_cost
from .gates import Gate, GatedLinear, close_, open_prob, sample


@dataclass
class BlockStack:
    """Blocks with one layout and the same gates: `gates[role][b]` is block b's gate on the deletable
    side of `role` (coupling.DELETABLE_SIDE), the same size and parameterisation in every block."""

    layout: BlockLayout
    n_blocks: int
    gates: dict[str, list[Gate]]

    def _per_role(self, fn) -> dict[str, torch.Tensor]:
        """fn(theta of the role's gates, concatenated; their GateParam), as (n_blocks, size)."""
        return {role: fn(torch.cat([g.theta for g in gates]), gates[0].param).view(self.n_blocks, -1)
                for role, gates in self.gates.items()}

    def open(self, hard: bool) -> dict[str, torch.Tensor]:
        """Each role's open indicators (hard: evaluation value > 0, as float) or P(open)."""
        if hard:
            return self._per_role(lambda t, p: (sample(t, p, training=False) > 0.0).float())
        return self._per_role(open_prob)

    def values(self) -> dict[str, torch.Tensor]:
        """Each role's evaluation gate values."""
        return self._per_role(lambda t, p: sample(t, p, training=False))

    def kept_params(self, hard: bool) -> torch.Tensor:
        """Linear parameters of all the stack's blocks that survive (expected, or exact with `hard`)."""
        if not self.gates:  # nothing gated: every block keeps everything (keep() sees one block)
            return kept_params(keep({}, self.layout), self.layout) * self.n_blocks
        return kept_params(keep(self.open(hard), self.layout), self.layout, self.n_blocks)

    # ---- MLP units (schedule taylor) ----------------------------------------------------------------
    @property
    def unit_gates(self) -> dict[str, list[Gate]]:
        """The gates of the MLP units (up and gate rows, down columns), by role."""
        return {r: self.gates[r] for r in MLP_ROLES if r in self.gates}

    @property
    def n_units(self) -> int:
        return self.n_blocks * self.layout.intermediate

    def unit_cost(self) -> int:
        return mlp_unit_cost(self.layout)

    def taylor_scores(self) -> torch.Tensor:
        """Per MLP unit (block-major), the sum of its gates' Taylor terms since the last reset."""
        sums = [torch.cat([g.taylor_sum() for g in gates]) for gates in self.unit_gates.values()]
        return torch.stack(sums).sum(0) if len(sums) > 1 else sums[0]

    def close_units(self, mask: torch.Tensor) -> None:
        """Close the MLP units in `mask` (block-major, `n_units` long) in every gate that carries them."""
        mask = mask.view(self.n_blocks, -1)
        for gates in self.unit_gates.values():
            close_(gates, mask)


def stack_blocks(blocks: list[tuple[BlockLayout, dict[str, GatedLinear]]]) -> list[BlockStack]:
    """Group blocks that have one layout and the same deletable gates (sizes and parameterisations):
    in the order their first block comes, each stack's blocks in model order. A transformer's blocks
    usually form one stack."""
    stacks: dict[tuple, BlockStack] = {}
    for lay, gated in blocks:
        sides = {role: m.gates().get(DELETABLE_SIDE[role]) for role, m in gated.items()}
        gates = {role: g for role, g in sides.items() if g is not None}
        key = (lay, tuple(sorted((role, g.theta.numel(), g.param) for role, g in gates.items())))
        if key not in stacks:
            stacks[key] = BlockStack(lay, 0, {role: [] for role in gates})
        stack = stacks[key]
        stack.n_blocks += 1
        for role, g in gates.items():
            stack.gates[role].append(g)
    return list(stacks.values())
