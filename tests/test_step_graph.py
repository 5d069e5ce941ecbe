"""Training steps replayed as CUDA graphs (training/step_graph.py) train exactly as eager steps do.

The GPU tests run where CUDA is (the device machine: `pytest tests/test_step_graph.py`); here only
the host-side rules run: one shape per batch, and which steps stay eager.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from finegates.data.encoding import Encoded
from finegates.data.tasks import Example
from finegates.loaders import default_model_path, load_tokenizer
from finegates.training.step_graph import StepReplayer
from run_helpers import make_tiny_bert, write_task

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_full_length_batches_have_one_shape():
    tok = load_tokenizer(str(default_model_path()))
    data = Encoded([Example(("a short one",), 0), Example(("a somewhat longer sentence than that",), 1)], tok, 32, False)
    assert data.batch([0])["input_ids"].shape[1] < 32  # padded to its own longest
    for idx in ([0], [1], [0, 1]):
        b = data.batch(idx, full_length=True)
        assert b["input_ids"].shape[1] == 32 and b["attention_mask"].shape == b["input_ids"].shape


def test_other_batches_and_keyless_steps_run_eagerly():
    """Nothing is captured (the step function is never called) for a short batch or a key of None."""
    calls = []
    rep = StepReplayer([], lambda: None, batch_size=4, say=calls.append)
    fn = lambda b: calls.append(b)  # noqa: E731
    assert rep.step(fn, {"input_ids": torch.zeros(3, 8, dtype=torch.long)}, ()) is None  # an epoch's short batch
    assert rep.step(fn, {"input_ids": torch.zeros(4, 8, dtype=torch.long)}, None) is None  # the method cannot
    assert calls == [] and rep.captures == 0


@cuda
@pytest.mark.parametrize("method,recipe,options,family", [
    ("gates", "frozen", {}, "BertModel"),  # Taylor closing (hooks into fixed buffers), rank-4 update
    ("gates", "frozen", {}, "MPNetModel"),  # eager attention: transformers makes a constant on the device
    ("gates", "fast", {"gate.param.noise_std": 0.0}, "BertModel"),  # top-k penalty: device scalars, lambda 0 at first
    ("lora", None, {}, "BertModel"),  # (its dropout off below: no random numbers)
    ("full", None, {}, "BertModel"),
])
def test_replayed_steps_train_like_eager_steps(tmp_path, method, recipe, options, family):
    from finegates.training.classify import train
    from finegates.training.config import TrainConfig

    # no dropout and no gate noise: both runs draw no random numbers, so they must agree
    model = make_tiny_bert(tmp_path / "m", model_class=family, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    task = write_task(tmp_path / "d", n_train=40)  # 6 words a line: every example is 8 tokens, as padded
    runs = {}
    for graphs in (False, True):
        cfg = TrainConfig(out=tmp_path / f"run-{graphs}", model=str(model), train_file=task[0], eval_file=task[1],
                          text_columns=("text",), method=method, recipe=recipe or "finetune", recipe_options=options,
                          batch_size=4, max_length=8, epochs=2, device="cuda", cuda_graphs=graphs, progress=False,
                          method_options={"dropout": "0"} if method == "lora" else {})
        runs[graphs] = (train(cfg), load_file(str(cfg.out / "trainable.safetensors")))
    (eager, eager_t), (graphed, graphed_t) = runs[False], runs[True]
    assert eager["graph_steps"] == 0 and graphed["graph_steps"] == graphed["steps"] == 20, graphed["graph_fallback"]
    assert graphed_t.keys() == eager_t.keys()
    for k, v in eager_t.items():
        torch.testing.assert_close(graphed_t[k], v, rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
    if recipe == "frozen":  # closes by decision, on schedule (fast's penalty needs more than 20 steps)
        assert graphed["removable_fraction"] == eager["removable_fraction"] > 0.3


@cuda
def test_host_constants_made_while_capturing_are_replayed_from_pinned_memory():
    from finegates.training.step_graph import PinnedConstants

    x = torch.ones(4, device="cuda")
    constants = PinnedConstants(capacity=256)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), constants:  # a pageable copy would fail the capture
        y = x * torch.tensor(3.0, device="cuda") + torch.arange(4).to("cuda", torch.float32)
    x.fill_(2.0)
    graph.replay()
    torch.testing.assert_close(y, torch.tensor([6.0, 7.0, 8.0, 9.0], device="cuda"))
    with pytest.raises(RuntimeError, match="bytes of host constants"):
        constants.send(torch.zeros(300, dtype=torch.uint8), torch.device("cuda"))


def test_the_target_of_a_host_to_device_copy_is_read_from_every_spelling():
    from finegates.training.step_graph import _target

    cuda0 = torch.device("cuda", 0)
    assert _target(torch.Tensor.to, ("cuda:0",), {}) == (cuda0, None)
    assert _target(torch.Tensor.to, (), {"device": "cuda:0", "dtype": torch.long, "copy": True}) == (cuda0, torch.long)
    assert _target(torch.Tensor.to, (torch.float16,), {}) == (None, torch.float16)  # stays on the host
    assert _target(torch.Tensor.cuda, (0,), {}) == (cuda0, None)
    assert _target(torch.Tensor.to, ("not a device",), {}) == (None, None)  # runs unchanged
