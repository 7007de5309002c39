"""The round pipeline: load the pool → PDCL → dual head → embed → select → publish.

`execute(round_id)` is all a Celery task or the embedded runner calls. It claims the round,
computes with the learning library (no database there), and publishes the query set, duals,
checkpoint and holdout metrics in one transaction that only the lease holder can commit, so
a round gets exactly one query set however often its task is delivered.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from billiard.exceptions import SoftTimeLimitExceeded
from sklearn.decomposition import PCA
from sqlalchemy import insert, update
from sqlmodel import Session, col, select

from service.blobs import BlobStore, FileBlobStore
from service.db import get_engine
from service.images import decode_array, load_npy
from service.models import (
    BlobFormat,
    DualValue,
    Item,
    Label,
    ModelVersion,
    Pool,
    Query,
    Round,
    RoundStatus,
    Split,
    utcnow,
)
from service.settings import settings
from worker.ally.data import input_tensors
from worker.ally.loop import ask, evaluate, fit
from worker.ally.pdcl import EpochRecord, PDCLConfig, PDCLResult
from worker.ally.registry import get_strategy
from worker.ally.select import kmeans_coverage
from worker.ally.strategies import Selection
from worker.leases import Heartbeat, Stopped, claim, release, worker_name

log = logging.getLogger(__name__)


class RoundInputError(ValueError):
    """The round cannot run on what is stored (parameters, items, labels): retrying won't help."""


# Share of the progress bar each phase ends at.
PROGRESS = {"load": 0.1, "train": 0.7, "embed": 0.8, "select": 0.95}


@dataclass
class RoundInputs:
    """A pool as tensors: the labeled items, the unlabeled pool and the holdout."""

    task: str
    num_outputs: int
    labeled_ids: np.ndarray
    labeled_x: torch.Tensor
    labeled_y: torch.Tensor
    pool_ids: np.ndarray
    pool_x: torch.Tensor
    holdout_x: torch.Tensor
    holdout_y: torch.Tensor
    target_std: float = 1.0  # regression targets are standardized with labeled statistics


@dataclass
class Outcome:
    picks: Selection
    seconds: dict[str, float]
    metrics: dict[str, float | int]
    trained: PDCLResult | None = None  # None for a cold-start round
    checkpoint: bytes | None = None


def execute(round_id: int, worker: str | None = None) -> RoundStatus | None:
    """Run the round if this worker can claim it; return the status it ended in."""
    worker = worker or worker_name()
    if not claim(round_id, worker):
        log.info("round %s: not claimable (done, running elsewhere or out of attempts)", round_id)
        return None
    try:
        # The heartbeat also renews the lease from a thread while steps without beats run.
        with Heartbeat(round_id, worker) as heartbeat:
            with Session(get_engine()) as session:
                round_ = session.get(Round, round_id)
                pool = session.get(Pool, round_.pool_id)
                heartbeat.beat("load", 0.0, force=True)
                started = time.perf_counter()
                inputs = load_inputs(session, pool, blobs())
                load_seconds = time.perf_counter() - started
            outcome = compute(round_, pool, inputs, heartbeat)
            outcome.seconds = {"load": load_seconds, **outcome.seconds}
            heartbeat.beat("publish", PROGRESS["select"], force=True)
            return publish(round_id, worker, inputs, outcome)
    except Stopped as stopped:
        log.info("%s", stopped)
        return None
    except (RoundInputError, SoftTimeLimitExceeded) as error:  # another attempt would fail too
        log.exception("round %s failed", round_id)
        return release(round_id, worker, f"{type(error).__name__}: {error}"[:2000], final=True)
    except Exception as error:  # e.g. out of memory or a lost connection: try again
        log.exception("round %s failed", round_id)
        return release(round_id, worker, f"{type(error).__name__}: {error}"[:2000])


def blobs() -> BlobStore:
    return FileBlobStore(settings.blob_dir)


def compute(round_: Round, pool: Pool, inputs: RoundInputs, heartbeat: Heartbeat) -> Outcome:
    """The learning library's part of the round: no database in here."""
    if round_.seeding is not None:
        return cold_start(round_, inputs)
    try:
        strategy = get_strategy(round_.strategy, **round_.params)
    except (TypeError, ValueError) as error:
        raise RoundInputError(f"strategy {round_.strategy!r}: {error}") from error
    spec = pool.model_spec or {}
    try:
        config = PDCLConfig(**spec.get("training", {}))
    except TypeError as error:
        raise RoundInputError(f"pool {pool.id} model_spec.training: {error}") from error

    calibrating = strategy.constraint(inputs.task) == "auto"

    def on_epoch(record: EpochRecord) -> None:
        share = min(record.epoch / config.max_epochs, 1.0)
        if calibrating:  # two runs: the unconstrained one that sets ε, then PDCL
            share = (share + (not record.calibration)) / 2
        start = PROGRESS["load"]
        heartbeat.beat("train", start + share * (PROGRESS["train"] - start))

    trained, train_seconds = fit(
        strategy, inputs.task, inputs.labeled_x, inputs.labeled_y, inputs.labeled_ids,
        round_.seed, spec.get("network", "auto"), inputs.num_outputs, config, on_epoch=on_epoch,
    )  # fmt: skip
    heartbeat.beat("embed", PROGRESS["train"], force=True)
    picks, seconds = ask(
        strategy, trained, inputs.task, inputs.labeled_x, inputs.labeled_ids,
        inputs.pool_x, inputs.pool_ids, round_.budget, round_.seed,
    )  # fmt: skip
    metrics: dict[str, float | int] = {"labeled": len(inputs.labeled_ids)}
    if len(inputs.holdout_y):
        measured = evaluate(trained.model, inputs.task, inputs.holdout_x, inputs.holdout_y)
        if "mse" in measured:  # in the target's own units
            measured["mse"] *= inputs.target_std**2
        metrics |= measured | {"holdout": len(inputs.holdout_y)}
    buffer = io.BytesIO()
    torch.save(
        {
            "model": trained.model.state_dict(),
            "network": type(trained.model).__name__,
            "input_shape": list(inputs.labeled_x.shape[1:]),
            "num_outputs": inputs.num_outputs,
            "epsilon": None if trained.epsilon is None else float(np.mean(trained.epsilon)),
            "history": [vars(r) for r in trained.history],
        },
        buffer,
    )
    return Outcome(
        picks=picks,
        seconds={"train": train_seconds, **seconds},
        metrics=metrics,
        trained=trained,
        checkpoint=buffer.getvalue(),
    )


def cold_start(round_: Round, inputs: RoundInputs) -> Outcome:
    """Too few labels to train: cover the pool with k-means on a PCA of the raw inputs."""
    started = time.perf_counter()
    flat = inputs.pool_x.flatten(1).numpy()
    components = min(50, flat.shape[1], len(flat))
    features = PCA(components, random_state=round_.seed).fit_transform(flat)
    picked = kmeans_coverage(features, round_.budget, round_.seed)
    picks = Selection(ids=inputs.pool_ids[picked], scores=np.zeros(len(picked), dtype=np.float32))
    return Outcome(
        picks=picks,
        seconds={"select": time.perf_counter() - started},
        metrics={"labeled": len(inputs.labeled_ids)},
    )


def publish(
    round_id: int, worker: str, inputs: RoundInputs, outcome: Outcome
) -> RoundStatus | None:
    """Write the round's results in one transaction, only if this worker still holds it."""
    with Session(get_engine()) as session:
        finished = session.execute(
            update(Round)
            .where(
                col(Round.id) == round_id,
                col(Round.status) == RoundStatus.running,
                col(Round.claimed_by) == worker,
            )
            .values(
                status=RoundStatus.ready,
                phase="done",
                progress=1.0,
                eta_seconds=0.0,
                finished_at=utcnow(),
                lease_until=None,
                timings={k: round(v, 3) for k, v in outcome.seconds.items()},
                metrics=outcome.metrics,
            )
        )
        if finished.rowcount != 1:
            session.rollback()
            return None
        picks = outcome.picks
        clusters = picks.clusters if picks.clusters is not None else [None] * len(picks.ids)
        session.execute(
            insert(Query),
            [
                {
                    "round_id": round_id,
                    "item_id": int(item),
                    "rank": rank,
                    "score": float(score),
                    "cluster": None if cluster is None else int(cluster),
                }
                for rank, (item, score, cluster) in enumerate(
                    zip(picks.ids, picks.scores, clusters, strict=True)
                )
            ],
        )
        trained = outcome.trained
        if trained is not None and trained.epsilon is not None:
            duals = [
                {"round_id": round_id, "item_id": int(i), "value": float(v), "measured": True}
                for i, v in zip(trained.ids, trained.duals, strict=True)
            ]
            if picks.pool_scores is not None:
                duals += [
                    {"round_id": round_id, "item_id": int(i), "value": float(v), "measured": False}
                    for i, v in zip(inputs.pool_ids, picks.pool_scores, strict=True)
                ]
            session.execute(insert(DualValue), duals)
        if outcome.checkpoint is not None:
            session.add(
                ModelVersion(
                    round_id=round_id,
                    checkpoint=blobs().put(outcome.checkpoint),
                    metrics=outcome.metrics,
                )
            )
        session.commit()
    return RoundStatus.ready


# --- loading a pool ---------------------------------------------------------------------


def load_inputs(session: Session, pool: Pool, store: BlobStore) -> RoundInputs:
    """The pool's items as standardized tensors, with the latest label of each labeled item."""
    ids, splits, arrays = pool_arrays(session, pool, store)
    labels = latest_labels(session, pool)
    is_pool = splits == Split.pool.value
    labeled_mask = is_pool & np.isin(ids, list(labels))
    holdout_mask = (splits == Split.holdout.value) & np.isin(ids, list(labels))
    unlabeled_mask = is_pool & ~labeled_mask

    kind = str(pool.input_kind)
    reference = arrays[is_pool] if is_pool.any() else arrays
    labeled_x, pool_x, holdout_x = input_tensors(
        kind, reference, arrays[labeled_mask], arrays[unlabeled_mask], arrays[holdout_mask]
    )
    labeled_values = [labels[i] for i in ids[labeled_mask].tolist()]
    holdout_values = [labels[i] for i in ids[holdout_mask].tolist()]
    if pool.task == "classification":
        index = {name: k for k, name in enumerate(pool.classes or [])}
        labeled_y = torch.tensor([index[v] for v in labeled_values], dtype=torch.int64)
        holdout_y = torch.tensor([index[v] for v in holdout_values], dtype=torch.int64)
        return RoundInputs(
            "classification", len(index), ids[labeled_mask], labeled_x, labeled_y,
            ids[unlabeled_mask], pool_x, holdout_x, holdout_y,
        )  # fmt: skip
    values = np.asarray(labeled_values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else 0.0
    std = float(values.std()) if len(values) > 1 and values.std() > 0 else 1.0

    def standardized(v: list) -> torch.Tensor:
        return torch.tensor((np.asarray(v, dtype=np.float64) - mean) / std, dtype=torch.float32)

    return RoundInputs(
        "regression", 1, ids[labeled_mask], labeled_x, standardized(labeled_values),
        ids[unlabeled_mask], pool_x, holdout_x, standardized(holdout_values), target_std=std,
    )  # fmt: skip


def latest_labels(session: Session, pool: Pool) -> dict[int, str | float]:
    """item id -> its latest label value (the history is kept; the newest counts)."""
    rows = session.exec(
        select(Label.item_id, Label.value_class, Label.value_number)
        .where(Label.pool_id == pool.id)
        .order_by(col(Label.id))
    ).all()
    return {
        item: value_class if value_class is not None else value_number
        for item, value_class, value_number in rows
    }


def pool_arrays(
    session: Session, pool: Pool, store: BlobStore
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item ids [N], splits [N] and decoded arrays [N, ...] of a pool, from a local cache.

    Items never change once stored, so only items added since the cache was written are
    decoded; decoding every image per round was the reference code's largest cost.
    """
    rows = session.exec(
        select(Item.id, Item.split, Item.format, Item.sha256)
        .where(Item.pool_id == pool.id)
        .order_by(col(Item.id))
    ).all()
    if not rows:
        raise RoundInputError(f"pool {pool.id} has no items")
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    splits = np.array([str(r[1]) for r in rows])
    keys = np.array([r[3] for r in rows])
    cache = _cache_file(pool)
    cached_ids, cached_keys, cached_x = _read_cache(cache)
    # A cached id counts only with the same content: a database recreated over the same data
    # directory numbers its pools and items from 1 again.
    at = np.searchsorted(cached_ids, ids).clip(max=max(len(cached_ids) - 1, 0))
    known = (
        (cached_ids[at] == ids) & (cached_keys[at] == keys)
        if len(cached_ids)
        else np.zeros(len(ids), dtype=bool)
    )
    if known.all() and len(cached_ids) == len(ids):
        return ids, splits, cached_x
    fresh = [_decode(store, rows[i][2], rows[i][3]) for i in np.flatnonzero(~known)]
    shapes = {a.shape for a in fresh} | ({cached_x.shape[1:]} if known.any() else set())
    if len(shapes) > 1:
        raise RoundInputError(f"items of pool {pool.id} differ in shape: {sorted(shapes)}")
    x = np.empty((len(ids), *shapes.pop()), dtype=(fresh[0] if fresh else cached_x).dtype)
    if known.any():
        x[known] = cached_x[at[known]]
    if fresh:
        x[~known] = np.stack(fresh)
    _write_cache(cache, ids, keys, x)
    return ids, splits, x


def _decode(store: BlobStore, fmt: str, key: str) -> np.ndarray:
    data = store.get(key)
    return load_npy(data) if fmt == BlobFormat.npy else decode_array(data)


def _cache_file(pool: Pool) -> Path:
    return settings.data_dir / "cache" / f"pool-{pool.id}.npz"


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cached item ids [N] (ascending), their content keys [N] and arrays [N, ...]."""
    try:
        with np.load(path) as cached:
            return cached["ids"], cached["keys"], cached["x"]
    except (FileNotFoundError, OSError, KeyError, ValueError):  # KeyError: an older cache
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=str), np.empty(0)


def _write_cache(path: Path, ids: np.ndarray, keys: np.ndarray, x: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{worker_name().replace(':', '-')}.tmp.npz")
    np.savez(partial, ids=ids, keys=keys, x=x)
    partial.replace(path)  # atomic: concurrent workers never read half a cache
