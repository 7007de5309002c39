"""Primal-dual constrained learning (PDCL, Algorithm 1 of the paper).

Every labeled sample i carries a constraint ℓ'(f_θ(x_i), y_i) ≤ ε_i and a dual variable
λ_i ≥ 0. Training alternates T_p primal steps on the empirical Lagrangian

    L̂(θ, λ) = 1/|L| Σ_i [ ℓ(f_θ(x_i), y_i) + λ_i (ℓ'(f_θ(x_i), y_i) − ε_i) ]

with one projected dual ascent step λ_i ← [λ_i + η_d (ℓ'_i − ε_i)]₊ on the same mini-batch,
its slacks measured after the primal steps, so after training λ_i accumulates how long and
how much sample i violated its constraint.
With `epsilon=None` the duals stay at zero and this is plain ERM: the shared trainer of every
strategy, so strategies differ only in how they query.

Stopping never looks at unlabeled items: either a fixed schedule (up to `max_epochs`, ending
early once the running training accuracy reaches `target_accuracy`) or, with
`holdout_fraction > 0`, early stopping on a held-out slice of the labeled set, restoring the
best model together with the duals of that same epoch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from worker.ally.networks import Network, infer

Task = Literal["classification", "regression"]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> [B]

# Paper §5.2-5.3: 0.2 nats for cross-entropy, 0.1 for squared error on standardized targets.
DEFAULT_EPSILON: dict[str, float] = {"classification": 0.2, "regression": 0.1}


def per_sample_loss(task: Task) -> Loss:
    """ℓ: cross-entropy (classification) or squared error (regression, standardized targets)."""
    if task == "classification":
        return lambda outputs, y: F.cross_entropy(outputs, y, reduction="none")
    return lambda outputs, y: (outputs.squeeze(-1) - y) ** 2


@dataclass(frozen=True)
class PDCLConfig:
    # float: one ε for all; array [L]: ε_i per sample in `ids` order; "auto": calibrate (§5.4);
    # None: unconstrained ERM.
    epsilon: float | np.ndarray | Literal["auto"] | None = None
    epsilon_scale: float = 1.1  # c in ε = c · p_u for "auto"; the paper found [1.05, 1.25]
    dual_lr: float = 0.05  # η_d
    dual_lr_power: float = 0.0  # diminishing dual steps η_d / epoch**power (0: constant)
    lambda_init: float = 0.0
    primal_lr: float = 1e-3  # η_p (Adam)
    primal_lr_decay: float = 1.0  # η_p multiplied by this after every epoch
    primal_steps: int = 1  # T_p primal steps per dual step
    weight_decay: float = 0.0
    batch_size: int = 64
    max_epochs: int = 100
    target_accuracy: float = 0.99  # schedule stop for classification
    holdout_fraction: float = 0.0  # > 0: early stopping on this share of the labeled set
    patience: int = 2
    secondary_loss: Loss | None = field(default=None, compare=False)  # ℓ'; None: ℓ' = ℓ


@dataclass
class EpochRecord:
    epoch: int
    lagrangian: float  # mean of ℓ + λ(ℓ' − ε) over the epoch's batches
    loss: float  # mean ℓ
    mean_slack: float  # mean of ℓ' − ε after the primal steps (negative: met on average)
    active_share: float  # share of samples with λ > 0 after the epoch
    train_accuracy: float | None  # running accuracy over the epoch (classification)
    holdout_loss: float | None
    calibration: bool = False  # an epoch of the unconstrained run that sets ε = "auto"


@dataclass
class PDCLResult:
    model: Network
    ids: np.ndarray  # [L'] ids of the samples trained on (the holdout slice excluded)
    duals: np.ndarray  # [L'] λ_i, aligned with `ids`
    epsilon: np.ndarray | None  # [L'] the ε_i used (None: unconstrained)
    history: list[EpochRecord]
    best_epoch: int

    def duals_by_id(self) -> dict[int, float]:
        return dict(zip(self.ids.tolist(), self.duals.tolist(), strict=True))


def train(
    model: Network,
    x: torch.Tensor,
    y: torch.Tensor,
    ids: np.ndarray,
    task: Task,
    config: PDCLConfig,
    seed: int,
    on_epoch: Callable[[EpochRecord], bool | None] | None = None,
) -> PDCLResult:
    """Train `model` on the labeled set with PDCL; `on_epoch` returning True stops training."""
    if config.epsilon == "auto":
        epsilon = calibrate_epsilon(model, x, y, ids, task, config, seed, on_epoch)
        config = replace(config, epsilon=epsilon)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    train_pos, holdout_pos = _holdout_split(len(ids), config.holdout_fraction, generator)
    x_train, y_train = x[train_pos].to(device), y[train_pos].to(device)
    n = len(train_pos)

    loss_fn = per_sample_loss(task)
    secondary = config.secondary_loss or loss_fn
    constrained = config.epsilon is not None
    epsilon = _epsilon_vector(config.epsilon, ids, train_pos, device) if constrained else None
    duals = torch.full((n,), config.lambda_init if constrained else 0.0, device=device)

    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.primal_lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.primal_lr_decay)
    history: list[EpochRecord] = []
    best = (math.inf, 0, None, None)  # holdout loss, epoch, model state, duals
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        dual_lr = config.dual_lr / epoch**config.dual_lr_power
        sums = torch.zeros(4, device=device)  # lagrangian, loss, slack, correct
        order = torch.randperm(n, generator=generator).to(device)
        # Near-equal batches: a trailing batch of one would break BatchNorm.
        for batch in order.tensor_split(math.ceil(n / config.batch_size)):
            xb, yb = x_train[batch], y_train[batch]
            for _ in range(config.primal_steps):
                outputs = model(xb)
                loss = loss_fn(outputs, yb)
                if constrained:
                    slack = secondary(outputs, yb) - epsilon[batch]
                else:
                    slack = torch.zeros_like(loss)
                lagrangian = loss + duals[batch] * slack
                optimizer.zero_grad(set_to_none=True)
                lagrangian.mean().backward()
                optimizer.step()
            slack = slack.detach()
            if constrained:
                # Algorithm 1, lines 5-6: slacks at θ after the primal steps, then dual ascent.
                with torch.no_grad():
                    slack = secondary(model(xb), yb) - epsilon[batch]
                duals[batch] = dual_step(duals[batch], slack, dual_lr)
            correct = (
                (outputs.argmax(1) == yb).sum() if task == "classification" else loss.new_zeros(())
            )
            sums += torch.stack(
                [lagrangian.detach().sum(), loss.detach().sum(), slack.sum(), correct]
            )
        scheduler.step()
        lagrangian_mean, loss_mean, slack_mean, correct = (sums / n).tolist()
        holdout_loss = (
            _mean_loss(model, x[holdout_pos].to(device), y[holdout_pos].to(device), loss_fn)
            if len(holdout_pos)
            else None
        )
        record = EpochRecord(
            epoch=epoch,
            lagrangian=lagrangian_mean,
            loss=loss_mean,
            mean_slack=slack_mean,
            active_share=float((duals > 0).float().mean()),
            train_accuracy=correct if task == "classification" else None,
            holdout_loss=holdout_loss,
        )
        history.append(record)
        stop = bool(on_epoch(record)) if on_epoch else False
        if holdout_loss is not None:
            if holdout_loss < best[0]:
                best = (holdout_loss, epoch, copy.deepcopy(model.state_dict()), duals.clone())
            stop = stop or epoch - best[1] >= config.patience
        elif task == "classification":
            stop = stop or correct >= config.target_accuracy
        if stop:
            break

    best_epoch = history[-1].epoch
    if best[2] is not None:
        _, best_epoch, state, duals = best
        model.load_state_dict(state)
    model.eval()
    return PDCLResult(
        model=model,
        ids=np.asarray(ids)[train_pos.numpy()],
        duals=duals.cpu().numpy(),
        epsilon=epsilon.cpu().numpy() if constrained else None,
        history=history,
        best_epoch=best_epoch,
    )


def calibrate_epsilon(
    model: Network,
    x: torch.Tensor,
    y: torch.Tensor,
    ids: np.ndarray,
    task: Task,
    config: PDCLConfig,
    seed: int,
    on_epoch: Callable[[EpochRecord], bool | None] | None = None,
) -> float:
    """ε = c · p_u, p_u the final-epoch mean loss of unconstrained training (paper §5.4).

    `on_epoch` sees its epochs marked `calibration`, so a caller can report progress and stop.
    """
    probe = copy.deepcopy(model)
    report = None if on_epoch is None else lambda r: on_epoch(replace(r, calibration=True))
    result = train(probe, x, y, ids, task, replace(config, epsilon=None), seed, report)
    return config.epsilon_scale * result.history[-1].loss


def dual_step(duals: torch.Tensor, slack: torch.Tensor, dual_lr: float) -> torch.Tensor:
    """Projected dual ascent, Algorithm 1 line 6: λ ← [λ + η_d · s]₊."""
    return (duals + dual_lr * slack).clamp(min=0)


def _holdout_split(
    n: int, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    size = round(n * fraction) if n > 1 else 0
    order = torch.randperm(n, generator=generator)
    return order[size:].sort().values, order[:size].sort().values


def _epsilon_vector(
    epsilon: float | np.ndarray, ids: np.ndarray, train_pos: torch.Tensor, device: torch.device
) -> torch.Tensor:
    values = np.broadcast_to(np.asarray(epsilon, dtype=np.float32), (len(ids),))
    return torch.as_tensor(values[train_pos.numpy()].copy(), device=device)


def _mean_loss(model: Network, x: torch.Tensor, y: torch.Tensor, loss_fn: Loss) -> float:
    _, outputs = infer(model, x)
    return float(loss_fn(outputs, y).mean())
