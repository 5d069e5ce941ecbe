"""The `taylor` schedule (regularizer.py) and the default `finetune` recipe built on it.

Units close by decision: each step the least important open MLP units (exponential average of
their squared first-order Taylor scores, read from the gate values' gradients) are closed outright,
up to the cubic schedule's target. Tiny random BERTs built from a config; a few CPU steps each.
"""

from __future__ import annotations

import pytest
import torch
from test_baselines import cfg_for, tiny  # noqa: F401 - the module fixture
from transformers import BertConfig, BertForSequenceClassification

from finegates.core.gates import GateParam
from finegates.core.model import GateConfig, apply_gates
from finegates.training.regularizer import Regularizer, RegConfig
from finegates.training.classify import train

OPEN = GateParam(mean_fn="identity", init_mean=0.5, init_std=0.0, noise_std=0.0)  # the finetune recipe's gates


def _bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _steps(model, reg: Regularizer, steps: range, lr: float = 1e-2) -> list[tuple[float, float]]:
    """Train on one fixed batch; (scheduled target, hard removed fraction) after each step."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 100, (8, 12), generator=g), torch.randint(0, 2, (8,), generator=g)
    out = []
    for step in steps:
        model.train()
        penalty, _ = reg(step)
        loss = model(input_ids=x, labels=y).loss + penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        reg.after_step(step)
        out.append((reg.target, reg.removed_fraction()))
    return out


def _mlp_gates(model, layer: int):
    bert = model.bert.encoder.layer[layer]
    return bert.intermediate.dense.row_gate, bert.output.dense.col_gate


def test_units_the_output_ignores_close_first():
    """Units whose down-projection column is zero cannot change the loss: their Taylor score is
    exactly 0, so they are the ones closed while the target needs no more than them."""
    model = _bert()
    dead = torch.arange(0, 64, 3)  # 22 units of layer 0
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[:, dead] = 0.0
    apply_gates(model, GateConfig(param=OPEN, train_weights=False))
    probe = Regularizer(model, RegConfig(kind="budget", sparsity=0.1))
    unit = (2 * 32 + 1) / probe.dense  # one MLP unit's share of the blocks' parameters
    reg = Regularizer(model, RegConfig(kind="budget", schedule="taylor", units=("mlp",),
                                       sparsity=0.999 * 20 * unit, start_step=3))
    trace = _steps(model, reg, range(8))
    assert all(removed == 0.0 for _, removed in trace[:3])  # nothing closes before start_step
    up, down = _mlp_gates(model, 0)
    closed = torch.nonzero(down.closed()).flatten()
    assert len(closed) == 20 and set(closed.tolist()) <= set(dead.tolist())
    assert torch.equal(up.closed(), down.closed())  # a unit closes on all its gates
    assert not _mlp_gates(model, 1)[1].closed().any()


def test_removed_fraction_follows_the_cubic_schedule():
    model = _bert()
    apply_gates(model, GateConfig(param=OPEN, train_weights=True))
    reg = Regularizer(model, RegConfig(kind="budget", schedule="taylor", units=("mlp",), sparsity=0.4,
                                       start_step=2, ramp_steps=10))
    unit = (2 * 32 + 1) / reg.dense
    trace = _steps(model, reg, range(20))
    targets = [t for t, _ in trace]
    assert targets[2] == 0.0 and targets[-1] == pytest.approx(0.4) and targets == sorted(targets)
    for target, removed in trace:
        assert target <= removed < target + unit  # on schedule, never more than one unit over
    assert reg(19)[0].item() == 0.0  # no penalty: closing is the schedule's decision


def test_closed_units_stay_closed_under_adam_momentum():
    """Closed gates keep the Adam momentum of their open past; a closed theta left at the clamp's
    edge would be carried back open by it."""
    model = _bert()
    apply_gates(model, GateConfig(param=OPEN, train_weights=True))
    reg = Regularizer(model, RegConfig(kind="budget", schedule="taylor", units=("mlp",), sparsity=0.4, start_step=6))
    gates = [g for layer in range(2) for g in _mlp_gates(model, layer)]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    x, y = torch.randint(0, 100, (8, 12)), torch.randint(0, 2, (8,))
    closed = None
    for step in range(30):
        model.train()
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        reg(step)
        reg.after_step(step)
        if step == 6:
            closed = [g.closed().clone() for g in gates]
            assert sum(int(c.sum()) for c in closed) > 20
    assert all(bool(g.closed()[c].all()) for g, c in zip(gates, closed))


def test_a_saturated_gate_is_still_measured():
    """The score comes from dL/dz, not from theta: a gate clamped at 1 (theta gets no gradient) counts."""
    model = _bert()
    apply_gates(model, GateConfig(param=OPEN))
    reg = Regularizer(model, RegConfig(kind="budget", schedule="taylor", units=("mlp",), sparsity=0.4))
    _, down = _mlp_gates(model, 0)
    with torch.no_grad():
        down.theta.fill_(0.8)  # value clamp(1.3) = 1: saturated
    model.train()
    model(input_ids=torch.randint(0, 100, (4, 8)), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    assert float(down.theta.grad.abs().max()) == 0.0
    assert float(down.taylor_sum().abs().max()) > 0.0
    down.reset_taylor()
    assert float(down.taylor_sum().abs().max()) == 0.0  # reset in place: the same buffer gathers the next step
    assert reg.importance is None  # nothing is scored until after_step


def test_taylor_refuses_what_it_cannot_close():
    with pytest.raises(ValueError, match="closes MLP units only"):
        RegConfig(kind="budget", schedule="taylor", units=("mlp", "vo"))
    with pytest.raises(ValueError, match="importance_decay"):
        RegConfig(kind="budget", schedule="taylor", units=("mlp",), importance_decay=1.0)
    model = _bert()
    apply_gates(model, GateConfig(param=OPEN, roles=("q", "k", "v", "o")))
    with pytest.raises(ValueError, match="needs gated MLP layers"):
        Regularizer(model, RegConfig(kind="budget", schedule="taylor", units=("mlp",)))


def test_default_recipe_finetunes_weights_hits_the_target_and_compresses_exactly(tiny, tmp_path):  # noqa: F811
    from finegates.pipeline import compress_run

    run = tmp_path / "ft"
    result = train(cfg_for(tiny, "gates", out=run, max_steps=12, sparsity=0.4))
    assert result["recipe"] == "finetune"
    assert 0.4 <= result["removable_fraction"] < 0.45
    assert result["trainable_params"] > 10 * result["gate_params"]  # the weights trained too
    report = compress_run(run, tmp_path / "small", 16)
    assert report["layer_linear_removed_fraction"] == pytest.approx(result["removable_fraction"])
    assert report["max_abs_diff"] < 1e-4 and report["prediction_agreement"] == 1.0


def test_blocks_without_gated_mlp_units_are_left_alone():
    """With only some blocks gated, the schedule ranks and closes the gated blocks' units only."""
    model = _bert()
    apply_gates(model, GateConfig(param=OPEN, layers=(1,)))
    reg = Regularizer(model, RegConfig(kind="budget", schedule="taylor", units=("mlp",), sparsity=0.2))
    _steps(model, reg, range(3))
    assert reg.importance.numel() == 64 and reg.removed_fraction() >= 0.2
    assert _mlp_gates(model, 1)[1].closed().any()
