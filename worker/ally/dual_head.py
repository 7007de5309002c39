"""The dual regression head f_ω (Algorithm 2, eq. 1): predicts λ from frozen embeddings.

Fit on the labeled samples' embeddings and final duals, both taken from the same trained
model, then asked for every unlabeled item. Targets are scaled to unit maximum for training
and scaled back at prediction; the softplus output keeps predictions non-negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DualHeadConfig:
    hidden: tuple[int, ...] = (128, 64, 64, 32, 16)  # 5 hidden layers, as in appendix E
    dropout: tuple[float, ...] = (0.3, 0.25)  # after the first two hidden layers
    lr: float = 2.5e-3
    weight_decay: float = 1e-2
    lr_decay: float = 0.95  # per epoch
    epochs: int = 150
    max_steps: int = 600  # caps the optimizer steps on large labeled sets
    batch_size: int = 256
    patience: int = 10  # epochs without a 1% better training loss


class DualHead(nn.Module):
    def __init__(self, in_features: int, config: DualHeadConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for index, hidden in enumerate(config.hidden):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            if index < len(config.dropout):
                layers.append(nn.Dropout(config.dropout[index]))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.layers(h)).squeeze(-1)


@dataclass
class FittedDualHead:
    net: DualHead | None  # None: every dual was zero (or a single one), predict a constant
    mean: torch.Tensor  # embedding standardization from the labeled set
    std: torch.Tensor
    scale: float  # predictions × scale = duals
    epochs: int

    @torch.inference_mode()
    def predict(self, embeddings: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """Predicted dual of every row of `embeddings` [N, d] -> [N] (none dropped)."""
        if self.net is None:
            return np.full(len(embeddings), self.scale, dtype=np.float32)
        self.net.eval()
        out = [
            self.net((torch.as_tensor(chunk, dtype=torch.float32) - self.mean) / self.std)
            for chunk in np.array_split(embeddings, max(1, -(-len(embeddings) // batch_size)))
        ]
        return (torch.cat(out) * self.scale).numpy()


def fit_dual_head(
    embeddings: np.ndarray, duals: np.ndarray, seed: int, config: DualHeadConfig | None = None
) -> FittedDualHead:
    """Fit f_ω by MSE on (embedding, dual) pairs of the labeled set: [L, d], [L] -> head."""
    # The head's matrices are tiny: extra intra-op threads only add synchronisation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(embeddings, duals, seed, config or DualHeadConfig())
    finally:
        torch.set_num_threads(threads)


def _fit(
    embeddings: np.ndarray, duals: np.ndarray, seed: int, config: DualHeadConfig
) -> FittedDualHead:
    h = torch.as_tensor(embeddings, dtype=torch.float32)
    mean, std = h.mean(0), h.std(0, correction=0).clamp_min(1e-6)
    scale = float(np.max(duals)) if len(duals) else 0.0
    if scale <= 0 or len(duals) < 2:
        return FittedDualHead(None, mean, std, scale, epochs=0)

    torch.manual_seed(seed)
    net = DualHead(h.shape[1], config)
    x, target = (h - mean) / std, torch.as_tensor(duals, dtype=torch.float32) / scale
    optimizer = torch.optim.Adam(
        net.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    generator = torch.Generator().manual_seed(seed)
    n = len(x)
    batches = max(1, -(-n // config.batch_size))
    best, stale, epochs = float("inf"), 0, 0
    net.train()
    max_epochs = min(config.epochs, max(1, config.max_steps // batches))
    for epochs in range(1, max_epochs + 1):  # noqa: B007 (the count is reported)
        total = 0.0
        # Near-equal batches: BatchNorm cannot train on a batch of one.
        for batch in torch.randperm(n, generator=generator).tensor_split(batches):
            loss = F.mse_loss(net(x[batch]), target[batch], reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            (loss / len(batch)).backward()
            optimizer.step()
            total += loss.item()
        scheduler.step()
        if total < 0.99 * best:
            best, stale = total, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    net.eval()
    return FittedDualHead(net, mean, std, scale, epochs=epochs)
