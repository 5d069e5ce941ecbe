"""Stochastic gates and the gated linear layer.

A gate vector z in [0, 1]^n scales the rows (outputs) or columns (inputs) of a frozen linear
layer: `y = z_r * (W (z_c * x) + b)`. Each entry is a relaxed Bernoulli "stochastic gate"
(Yamada et al., 2020): a trainable mean plus Gaussian noise, clamped to [0, 1] in training,
the clamped mean at evaluation. A gate whose evaluation value is 0 closes its row/column,
which `compress` then deletes.

The parameterisation is data (`GateParam`), so the paper's published one, the original STG and
our own recipe share one implementation:

    mu       = tanh(theta)  (paper)   or   theta  (stg, ours)
    training   z = clamp(mu + 0.5 + eps, 0, 1),  eps ~ N(0, noise_std^2)
    eval       z = clamp(mu + 0.5, 0, 1)
    P(open)  = Phi((mu + 0.5) / reg_sigma)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .gated_linear import gated_linear

OFFSET = 0.5  # the +0.5 shift of both the paper's code and STG
# parameter names that exist only while training (gates, the low-rank update merged before
# compression): a deployed model holds none of them, so no parameter count includes them
TRAINING_ONLY = ("theta", "lora_A", "lora_B")
CLOSED_THETA = -10.0  # a theta whose gate is 0 for both mean functions, far from the clamp: stays closed


@dataclass(frozen=True)
class GateParam:
    """How a gate's mean, noise and open probability are computed."""

    mean_fn: str = "tanh"  # "tanh" (paper) or "identity" (STG)
    init_mean: float = 1.0  # theta ~ N(init_mean, init_std^2)
    init_std: float = 0.1
    noise_std: float = 0.1  # training noise on the gate value
    reg_sigma: float = 0.5  # sigma of the Gaussian CDF in P(open)

    def __post_init__(self) -> None:
        if self.mean_fn not in ("tanh", "identity"):
            raise ValueError(f"mean_fn must be 'tanh' or 'identity', got {self.mean_fn!r}")
        if self.noise_std < 0 or self.init_std < 0 or self.reg_sigma <= 0:
            raise ValueError("gate noise/init std must be >= 0 and reg_sigma > 0")


def mean(theta: torch.Tensor, param: GateParam) -> torch.Tensor:
    return torch.tanh(theta) if param.mean_fn == "tanh" else theta


def sample(theta: torch.Tensor, param: GateParam, training: bool) -> torch.Tensor:
    """Gate values: clamp(mu + 0.5 + noise, 0, 1), with the noise only in training."""
    shifted = mean(theta, param) + OFFSET
    if training and param.noise_std > 0:
        shifted = shifted + param.noise_std * torch.randn_like(shifted)
    return shifted.clamp(0.0, 1.0)


def open_prob(theta: torch.Tensor, param: GateParam) -> torch.Tensor:
    """P(open) = Phi((mu + 0.5) / sigma): the differentiable quantity the penalty acts on."""
    x = (mean(theta, param) + OFFSET) / param.reg_sigma
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def close_(gates: list["Gate"], masks: torch.Tensor) -> None:
    """Close for good the entries of gate i that row i of `masks` marks (gates of one size): their
    theta goes to CLOSED_THETA, where neither noise nor the (clamped, hence zero) gradient can bring
    it back. A mask, not an index: no read-back from the device; two multi-tensor kernels for the
    whole list."""
    with torch.no_grad():
        thetas = [g.theta for g in gates]
        keep = (~masks).to(thetas[0].dtype)
        torch._foreach_mul_(thetas, list(keep.unbind(0)))  # closed entries -> 0 exactly, others unchanged
        torch._foreach_add_(thetas, list((masks.to(keep.dtype) * CLOSED_THETA).unbind(0)))


class Gate(nn.Module):
    """One vector of stochastic gates."""

    def __init__(self, size: int, param: GateParam) -> None:
        super().__init__()
        self.param = param
        self.theta = nn.Parameter(torch.empty(size))
        # with `track_taylor`: sum of z * dL/dz since the last reset, accumulated in place in one buffer
        # (allocated by the first backward pass), so a step replayed as a CUDA graph adds to it too
        self.taylor: torch.Tensor | None = None
        self.track_taylor = False
        self.pending: torch.Tensor | None = None  # this forward's values, from the model's GateBank
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.theta.normal_(self.param.init_mean, self.param.init_std)

    @property
    def mu(self) -> torch.Tensor:
        return mean(self.theta, self.param)

    def forward(self) -> torch.Tensor:
        """The gate values for this forward pass (noisy in training mode): the ones the model's
        `GateBank` computed for every gate at once, else computed here."""
        z, self.pending = self.pending, None
        if z is None:
            z = sample(self.theta, self.param, self.training)
        if self.track_taylor and z.requires_grad:
            z.register_hook(self._taylor_hook(z.detach()))
        return z

    def _taylor_hook(self, z: torch.Tensor):
        """First-order loss change of closing each gate, -z * dL/dz, summed over the batch.

        Read from the gate *value*, not from theta, so a saturated gate (clamped at 1, whose theta
        gets no gradient) is still measured.
        """
        def hook(grad: torch.Tensor) -> None:
            self.taylor_sum().add_(z * grad)
        return hook

    def taylor_sum(self) -> torch.Tensor:
        """The Taylor terms gathered since the last `reset_taylor` (zeros when no backward pass ran):
        the buffer itself, which the next backward pass adds to."""
        if self.taylor is None:
            self.taylor = torch.zeros_like(self.theta, dtype=torch.float32)
        return self.taylor

    def reset_taylor(self) -> None:
        if self.taylor is not None:
            self.taylor.zero_()

    def close(self, mask: torch.Tensor) -> None:
        """Close the gates in `mask` for good (`close_`, for one gate)."""
        close_([self], mask.unsqueeze(0))

    def values(self) -> torch.Tensor:
        """Deterministic evaluation values (what gets baked into the weights)."""
        return sample(self.theta, self.param, training=False)

    def open_prob(self) -> torch.Tensor:
        """P(open) = Phi((mu + 0.5) / sigma): the differentiable quantity the penalty acts on."""
        return open_prob(self.theta, self.param)

    def closed(self) -> torch.Tensor:
        """Boolean mask of closed gates (evaluation value exactly 0)."""
        return self.values() <= 0.0

    def extra_repr(self) -> str:
        return f"size={self.theta.numel()}, mean_fn={self.param.mean_fn}"


class GateBank:
    """Every gate of a model sampled in one pass at the start of each training forward.

    Why: sampled gate by gate, MPNet-base's 144 gate vectors cost a few small kernels each (mean,
    shift, noise, clamp, and their backward) per step, which on a GPU is host time, not GPU time.
    Concatenated, the same arithmetic is a handful of kernels for all of them. A forward pre-hook
    of the model hands each gate its slice (`Gate.pending`); a forward hook drops what a forward
    did not use, so no value outlives its forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self.groups: dict[GateParam, list[Gate]] = {}
        for g in model.modules():
            if isinstance(g, Gate):
                self.groups.setdefault(g.param, []).append(g)
        self.handles = [model.register_forward_pre_hook(self._sample), model.register_forward_hook(self._drop)]

    def _sample(self, model: nn.Module, args) -> None:
        if not (model.training and torch.is_grad_enabled()):
            return  # evaluation: each gate's deterministic value, computed where it is used
        for param, gates in self.groups.items():
            z = sample(torch.cat([g.theta for g in gates]), param, training=True)
            for g, zg in zip(gates, z.split([g.theta.numel() for g in gates])):
                g.pending = zg

    def _drop(self, model: nn.Module, args, output) -> None:
        for gates in self.groups.values():
            for g in gates:
                g.pending = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class GatedLinear(nn.Module):
    """A frozen `nn.Linear` with row and column gates: `y = z_r * (W (z_c * x) + b)`.

    Row gates also scale the bias, so a closed row outputs exactly 0 (METHOD.md, section 1).
    The wrapped layer stays reachable as `.base` and keeps its parameter names under it.
    """

    def __init__(
        self,
        base: nn.Linear,
        param: GateParam,
        rows: bool = True,
        cols: bool = True,
        role: str = "",
        layer: int = -1,
        adapter_rank: int = 0,
        adapter_alpha: float = 16.0,
    ) -> None:
        super().__init__()
        self.base = base
        self.role = role
        self.layer = layer
        self.row_gate = Gate(base.out_features, param) if rows else None
        self.col_gate = Gate(base.in_features, param) if cols else None
        for p in self.base.parameters():
            p.requires_grad_(False)
        # Optional low-rank update of the frozen weight, gated like it: W' = z_r (W + s B A) z_c
        # (the authors' SparseLoRALayer). B starts at zero, so training starts from W exactly;
        # `merged` folds s B A into W, so the compressed model is no larger than without it.
        self.adapter_scale = adapter_alpha / adapter_rank if adapter_rank else 0.0
        self.lora_A = self.lora_B = None
        if adapter_rank:
            self.lora_A = nn.Parameter(torch.empty(adapter_rank, base.in_features))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, adapter_rank))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        device = base.weight.device
        self.to(device)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads `.weight.dtype`/`.device` of projections
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def gates(self) -> dict[str, Gate]:
        return {
            side: g
            for side, g in (("rows", self.row_gate), ("cols", self.col_gate))
            if g is not None
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_r = None if self.row_gate is None else self.row_gate()
        z_c = None if self.col_gate is None else self.col_gate()
        return gated_linear(x, self.base.weight, self.base.bias, z_r, z_c, self.lora_A, self.lora_B,
                            self.adapter_scale)  # W' = z_r (W + s B A) z_c, in one node

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` with the evaluation gates baked in: `W <- Diag(z_r) W Diag(z_c)`."""
        w = self.base.weight.detach().clone()
        if self.lora_A is not None:
            w += (self.adapter_scale * (self.lora_B.float() @ self.lora_A.float())).to(w.dtype)
        b = None if self.base.bias is None else self.base.bias.detach().clone()
        if self.col_gate is not None:
            w *= self.col_gate.values().to(w.dtype)[None, :]
        if self.row_gate is not None:
            z_r = self.row_gate.values().to(w.dtype)
            w *= z_r[:, None]
            if b is not None:
                b *= z_r
        out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
        return out

    def gated_off_params(self) -> int:
        """The paper's count: numel(W) - open_rows x open_cols (credits residual columns too)."""
        out_open = self.out_features
        in_open = self.in_features
        if self.row_gate is not None:
            out_open -= int(self.row_gate.closed().sum())
        if self.col_gate is not None:
            in_open -= int(self.col_gate.closed().sum())
        return self.base.weight.numel() - out_open * in_open

    def extra_repr(self) -> str:
        return f"role={self.role!r}, layer={self.layer}"
