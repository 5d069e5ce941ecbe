"""ONNX export of a (compressed or dense) classifier, checked against PyTorch with ONNX Runtime.

    path = export_onnx(model, "model.onnx")          # inputs: the model's token inputs; output: logits
    diff = onnx_max_abs_diff(model, path, batch)     # PyTorch vs ONNX Runtime on real inputs
    quantize_int8(path, "model-int8.onnx")           # dynamic int8 weights for CPU inference

Batch and sequence axes are dynamic. `CompactAttention` exports as plain MatMul/Softmax ops, so
a compressed model needs no custom operator.

Two choices here were measured, not assumed (compressed int8 MiniLM-L6, batch 8 x 128, 2 CPU cores,
ONNX Runtime 1.32; BENCHMARKS.md section 2c): attention is traced in its eager form, and sessions
skip ONNX Runtime's SkipLayerNormalization fusion. Together: 67 -> 45 ms, timed interleaved.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from .core.arch import spec_for
from .data.files import atomic_write


def input_names(model: nn.Module) -> list[str]:
    """Token inputs the model takes: BERT also reads segment ids (sentence pairs)."""
    names = ["input_ids", "attention_mask"]
    if spec_for(model).family == "bert" and getattr(model.config, "type_vocab_size", 1) > 1:
        names.append("token_type_ids")
    return names


class _Logits(nn.Module):
    """Positional inputs in, logits out: the signature ONNX graphs want."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if spec_for(self.model).decoder:  # no KV cache in the graph
            extra["use_cache"] = False
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def _example(names: list[str], batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(3, 50, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2:] = 0  # trace the padded-mask path, not a mask-free shortcut
    return tuple({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}[n] for n in names)


@contextmanager
def eager_attention(model: nn.Module):
    """Run attention as matmul-softmax-matmul inside the block (then restore the model's choice).

    Why: the exporter decomposes SDPA with a NaN guard over every attention score (IsNaN + Where, for
    rows with no visible key) and a K transpose through Shape/Slice/Concat/Reshape; on ONNX Runtime's
    CPU those nodes took a fifth of int8 MiniLM's time. Eager attention computes the same
    scores and outputs (a row with no visible key is one no output reads), and every family has it.
    Families that only have eager attention (MPNet) are left as they are.
    """
    before = model.config._attn_implementation
    switch = before != "eager" and getattr(model, "_can_set_attn_implementation", lambda: False)()
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if switch:
            model.set_attn_implementation(before)


def export_onnx(model: nn.Module, path, opset: int = 18) -> Path:
    """Write `model` as ONNX (dynamic batch and sequence axes, eager attention), atomically."""
    model = model.eval()
    names = input_names(model)
    wrapper = _Logits(model, names).eval()
    example = _example(names)
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=8192)
    dynamic = tuple({0: batch, 1: seq} for _ in names)

    def write(tmp: str) -> None:
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
        with warnings.catch_warnings(), torch.no_grad(), eager_attention(model):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, example, input_names=names, output_names=["logits"],
                                        dynamic_shapes=dynamic, opset_version=opset, dynamo=True,
                                        external_data=False, verbose=False)
        program.save(tmp, external_data=False)

    return atomic_write(Path(path), write)


def quantize_int8(src, dst) -> Path:
    """Dynamic int8 quantization (ONNX Runtime) of an fp32 export, written atomically to `dst`.

    Weights of MatMul/Gemm with a constant weight (every projection: a compressed model's padded
    weights are folded to constants at export) become int8, one scale per output channel;
    activations are quantized per batch at run time, so no calibration data is needed. Attention's
    activation-by-activation MatMuls stay fp32 (`MatMulConstBOnly`). That is ONNX Runtime's
    recommended mode for transformers on CPU; per-channel scales keep small models within a point.
    Measured and not taken (int8 MiniLM, 2 cores): quantizing attention's MatMuls too, or one scale
    per tensor, changed latency by less than the noise (~2 ms of ~44).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def write(tmp: str) -> None:
        root = logging.getLogger()  # the quantizer logs per-node notes on the root logger
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(src), tmp, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})
        finally:
            root.setLevel(level)

    return atomic_write(Path(dst), write)


# ONNX Runtime fusions that make these graphs slower on CPU. SkipLayerNormalization (residual Add +
# LayerNorm in one kernel) ran 8x slower than the Add and LayerNormalization it replaces (1.07 vs
# 0.14 ms at 8 x 128 x 384, ONNX Runtime 1.32, 2 cores): int8 MiniLM 55 -> 45 ms without it.
SLOW_FUSIONS = ("SkipLayerNormFusion",)


def ort_session(path, threads: int | None = None, save_optimized=None):
    """A CPU session with every graph optimization except `SLOW_FUSIONS`; `threads` intra-op threads.

    `save_optimized`: also write the graph ONNX Runtime runs after its fusions there (to inspect them).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if save_optimized:
        opts.optimized_model_filepath = str(save_optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(SLOW_FUSIONS))


def ort_feed(session, batch: dict[str, torch.Tensor]) -> dict:
    wanted = [i.name for i in session.get_inputs()]
    return {n: batch[n].numpy() if n in batch else torch.zeros_like(batch["input_ids"]).numpy() for n in wanted}


@torch.no_grad()
def onnx_max_abs_diff(model: nn.Module, path, batches: list[dict[str, torch.Tensor]]) -> float:
    """Largest |logit difference| between PyTorch and ONNX Runtime over `batches`."""
    session = ort_session(path)
    model.eval()
    diff = 0.0
    for b in batches:
        ref = model(**b).logits.float()
        out = torch.from_numpy(session.run(["logits"], ort_feed(session, b))[0])
        diff = max(diff, float((ref - out).abs().max()))
    return diff
