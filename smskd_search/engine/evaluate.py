"""Accuracy and loss of a model on a split, with the sample size that every printed accuracy carries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smskd_search.data import Split
from smskd_search.engine.device import Precision
from smskd_search.stats import binomial_se


@dataclass
class EvalResult:
    acc: float
    loss: float
    n: int

    @property
    def stderr(self) -> float:
        """Binomial standard error of the accuracy: the noise floor of comparisons on this split."""
        return binomial_se(self.acc, max(self.n, 1)) or 0.0


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, precision: Precision, batch_size: int = 1024) -> EvalResult:
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=split.labels.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.labels.device)
    try:
        for x, y, _ in split.loader(batch_size):
            with precision.autocast():
                logits, _ = model(precision.prepare_input(x))
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    n = len(split)
    return EvalResult(acc=correct.item() / n, loss=loss_sum.item() / n, n=n)
