"""The student's compute dtype in training: bfloat16 matmuls where the hardware has them.

``train.autocast`` runs the sparsified student's linear layers in bfloat16 (the dtype real users
run on GPUs) while biases, optimizer state, loss, KL and the teacher stay float32. Autocast alone
re-casts every frozen weight on every forward (its cast cache only keeps trainable leaves), which
cost ~10% of a CPU step; :class:`Bf16Student` casts each linear weight once and swaps the copies in
for the step. The matmuls see the same bfloat16 operands as under plain autocast, so losses and
gradients are bit-identical (tested), only faster. The student's attention runs the eager
implementation (bfloat16 matmuls, fp32 softmax) instead of SDPA: on CPU, SDPA's flash-attention
backward in bfloat16 was 15% of a step at 128 tokens, and the step went from 1.70 to 1.54 s
(2 AMD Zen 4 cores, medians of 4 rounds).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def uses_autocast(setting: str, model: nn.Module) -> bool:
    """``train.autocast`` resolved for this model: ``auto`` is on for a float32 model on a CPU
    with AMX or AVX512-BF16 (bfloat16 matmuls in hardware), off elsewhere."""
    if setting != "auto":
        return setting == "bfloat16"
    param = next(model.parameters())
    bf16_cpu = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return param.device.type == "cpu" and param.dtype == torch.float32 and bf16_cpu


class Bf16Student:
    """bfloat16 copies of a frozen model's float32 linear weights, made once (on each weight's
    device; +half the linear weights' bytes), swapped in by :meth:`active` under autocast."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device_type = next(model.parameters()).device.type
        self.copies = {
            module: nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
            for module in model.modules()
            if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32
        }

    @contextmanager
    def active(self) -> Iterator[None]:
        """Autocast to bfloat16 with the cached weight copies in place and eager attention; the
        float32 weights and the attention implementation are restored on exit, whatever happens
        inside."""
        originals = {module: module._parameters["weight"] for module in self.copies}
        attention = self.model.config._attn_implementation
        try:
            for module, copy in self.copies.items():
                module._parameters["weight"] = copy
            if attention == "sdpa":
                self.model.set_attn_implementation("eager")
            with torch.autocast(self.device_type, dtype=torch.bfloat16):
                yield
        finally:
            for module, weight in originals.items():
                module._parameters["weight"] = weight
            if self.model.config._attn_implementation != attention:
                self.model.set_attn_implementation(attention)
