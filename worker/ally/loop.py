"""One active-learning round as plain functions: `fit` (train) then `ask` (embed, query).

The service's round pipeline and the benchmark both call `fit` and `ask`, so what is
measured is what is served; `run_round` chains the two.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from worker.ally.networks import Network, default_device, infer, make_network
from worker.ally.pdcl import EpochRecord, PDCLConfig, PDCLResult, Task, per_sample_loss, train
from worker.ally.strategies import Evidence, Selection, Strategy


@dataclass
class RoundResult:
    query: Selection
    trained: PDCLResult
    seconds: dict[str, float]  # train, embed, dual_head, select


def run_round(
    strategy: Strategy,
    task: Task,
    labeled_x: torch.Tensor,
    labeled_y: torch.Tensor,
    labeled_ids: np.ndarray,
    pool_x: torch.Tensor,
    pool_ids: np.ndarray,
    budget: int,
    seed: int,
    network: str = "auto",
    num_outputs: int | None = None,
    config: PDCLConfig | None = None,
    device: torch.device | None = None,
    on_epoch: Callable[[EpochRecord], bool | None] | None = None,
) -> RoundResult:
    """Train on the labeled set as `strategy` asks, then query `budget` pool items."""
    trained, train_seconds = fit(
        strategy, task, labeled_x, labeled_y, labeled_ids, seed,
        network, num_outputs, config, device, on_epoch,
    )  # fmt: skip
    query, seconds = ask(
        strategy, trained, task, labeled_x, labeled_ids, pool_x, pool_ids, budget, seed
    )
    return RoundResult(query=query, trained=trained, seconds={"train": train_seconds, **seconds})


def fit(
    strategy: Strategy,
    task: Task,
    labeled_x: torch.Tensor,
    labeled_y: torch.Tensor,
    labeled_ids: np.ndarray,
    seed: int,
    network: str = "auto",
    num_outputs: int | None = None,
    config: PDCLConfig | None = None,
    device: torch.device | None = None,
    on_epoch: Callable[[EpochRecord], bool | None] | None = None,
) -> tuple[PDCLResult, float]:
    """A new network trained on the labeled set: PDCL or ERM, as `strategy` asks."""
    started = time.perf_counter()
    if num_outputs is None:
        num_outputs = int(labeled_y.max()) + 1 if task == "classification" else 1
    config = replace(config or PDCLConfig(), epsilon=strategy.constraint(task))
    torch.manual_seed(seed)
    model = make_network(network, tuple(labeled_x.shape[1:]), num_outputs)
    model.to(device or default_device())
    trained = train(model, labeled_x, labeled_y, labeled_ids, task, config, seed, on_epoch)
    return trained, time.perf_counter() - started


def ask(
    strategy: Strategy,
    trained: PDCLResult,
    task: Task,
    labeled_x: torch.Tensor,
    labeled_ids: np.ndarray,
    pool_x: torch.Tensor,
    pool_ids: np.ndarray,
    budget: int,
    seed: int,
) -> tuple[Selection, dict[str, float]]:
    """The strategy's query of `budget` pool items, and the seconds spent on each step."""
    started = time.perf_counter()
    evidence = gather_evidence(trained, task, labeled_x, labeled_ids, pool_x, pool_ids)
    seconds = {"embed": time.perf_counter() - started}
    started = time.perf_counter()
    query = strategy.select(evidence, budget, seed)
    seconds.update(query.seconds)
    seconds["select"] = time.perf_counter() - started - sum(query.seconds.values())
    return query, seconds


def gather_evidence(
    trained: PDCLResult,
    task: Task,
    labeled_x: torch.Tensor,
    labeled_ids: np.ndarray,
    pool_x: torch.Tensor,
    pool_ids: np.ndarray,
) -> Evidence:
    """Embed the trained-on labeled items and the pool with the same (final) model."""
    position = {item: index for index, item in enumerate(np.asarray(labeled_ids).tolist())}
    trained_rows = torch.as_tensor([position[item] for item in trained.ids.tolist()])
    labeled_h, labeled_out = infer(trained.model, labeled_x[trained_rows])
    pool_h, pool_out = infer(trained.model, pool_x)
    return Evidence(
        task=task,
        labeled_ids=trained.ids,
        labeled_embeddings=labeled_h.float().cpu().numpy(),
        duals=trained.duals,
        pool_ids=np.asarray(pool_ids),
        pool_embeddings=pool_h.float().cpu().numpy(),
        pool_outputs=pool_out.float().cpu().numpy(),
        labeled_outputs=labeled_out.float().cpu().numpy(),
    )


def evaluate(model: Network, task: Task, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy (classification) or mean squared error in the given target units."""
    _, outputs = infer(model, x)
    y = y.to(outputs.device)
    if task == "classification":
        return {"accuracy": float((outputs.argmax(1) == y).float().mean())}
    return {"mse": float(per_sample_loss(task)(outputs, y).mean())}
