"""The SMSKD reference term: per-sample weights from the teacher's true-class probability (TCP).

    L_ref = mean_i( w_i * tau^2 * KL(softmax(z_R,i / tau) || softmax(z_S,i / tau)) )
    p_i   = softmax(z_T,i)[y_i]           (no gradient)
    w_i   = 1 - p_i  (inverse) | p_i (direct) | 1 (uniform) | 0 (none)
    optional: w_i <- w_i / mean_batch(w)  (batch_mean)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smskd_search.methods.base import kl_div_t


@torch.no_grad()
def tcp_weights(t_logits: torch.Tensor, labels: torch.Tensor, mode: str, normalize: str = "none") -> torch.Tensor:
    p = F.softmax(t_logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    if mode == "inverse":
        w = 1.0 - p
    elif mode == "direct":
        w = p
    elif mode == "uniform":
        w = torch.ones_like(p)
    elif mode == "none":
        return torch.zeros_like(p)
    else:
        raise ValueError(f"unknown weight mode {mode!r}")
    if normalize == "batch_mean":
        # Keeps the term alive when the teacher fits the training data (1 - p -> 0 everywhere).
        w = w / w.mean().clamp_min(1e-12)
    elif normalize != "none":
        raise ValueError(f"unknown normalization {normalize!r}")
    return w


def feature_mse_per_sample(s_feat: torch.Tensor, r_feat: torch.Tensor) -> torch.Tensor:
    return (s_feat.float() - r_feat.float()).pow(2).flatten(1).mean(1)


def reference_loss(
    s_out: torch.Tensor, r_out: torch.Tensor, weights: torch.Tensor, *, loss: str = "logit_kl", tau: float = 4.0
) -> torch.Tensor:
    """mean_i(w_i * d_i), with d_i the per-sample logit KL (or feature MSE) to the reference."""
    if loss == "logit_kl":
        d = kl_div_t(s_out, r_out, tau)  # tau^2 * KL(softmax(z_R/tau) || softmax(z_S/tau)) per sample
    elif loss == "feature_mse":
        d = feature_mse_per_sample(s_out, r_out)
    else:
        raise ValueError(f"unknown reference loss {loss!r}")
    return (weights * d).mean()
