"""Cross-entropy only: the student trained alone, the control every KD claim needs."""

from __future__ import annotations

import torch

from smskd_search.methods.base import KDBatch, Method, register_method


@register_method
class CE(Method):
    name = "ce"
    family = "none"
    reference = "no distillation (student trained on labels alone)"
    teacher_features = False

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return batch.s_logits.new_zeros((), dtype=torch.float32)
