"""The round pipeline on small real pools: what a round publishes, and exactly once."""

import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from service.blobs import FileBlobStore
from service.datasets import packaged
from service.db import get_engine, migrate
from service.images import load_npy
from service.importing import import_dataset
from service.models import DualValue, Item, ModelVersion, Pool, Round, RoundStatus, Split
from service.settings import settings
from tests.worker.conftest import sqlite_only
from tests.worker.factories import (
    add_round,
    get_round,
    import_pool,
    label,
    pool_items,
    queries,
    rows,
)
from tests.worker.test_leases import expire_lease
from worker import pipeline
from worker.ally.loop import evaluate
from worker.ally.networks import make_network
from worker.leases import Heartbeat, claim
from worker.pipeline import execute

# Enough for the network to learn something, few enough for a test.
LABELED = 60


def labeled_pool(dataset: str, size: int, **fields: Any) -> tuple[Pool, list[int]]:
    """A pool with LABELED of its pool items labeled; returns them too."""
    pool, truth = import_pool(dataset, size, **fields)
    chosen = sorted(truth)[:LABELED]
    label(pool, truth, chosen)
    return pool, chosen


def test_a_cold_start_round_queries_budget_distinct_unlabeled_items(database: Engine) -> None:
    pool, truth = import_pool("digits", 300)
    seeds = sorted(truth)[:5]  # too few to train on
    label(pool, truth, seeds)
    round_id = add_round(pool, budget=25, labeled=len(seeds))
    assert execute(round_id, "worker-a") == RoundStatus.ready
    round_ = get_round(round_id)
    assert round_.seeding == "kmeans-coverage" and round_.status == RoundStatus.ready
    assert (round_.phase, round_.progress, round_.attempts) == ("done", 1.0, 1)
    assert round_.metrics == {"labeled": len(seeds)} and set(round_.timings) == {"load", "select"}
    picked = queries(round_id)
    assert [rank for rank, _, _ in picked] == list(range(25))
    ids = [item for _, item, _ in picked]
    assert len(set(ids)) == 25
    assert set(ids) <= pool_items(pool, Split.pool) - set(seeds)
    assert rows(ModelVersion, round_id) == [] and rows(DualValue, round_id) == []


def test_a_redelivered_task_for_a_ready_round_changes_nothing(database: Engine) -> None:
    pool, _ = import_pool("digits", 200)
    round_id = add_round(pool, budget=10)
    assert execute(round_id, "worker-a") == RoundStatus.ready
    before, published = get_round(round_id), queries(round_id)
    assert execute(round_id, "worker-b") is None
    assert execute(round_id, "worker-a") is None
    after = get_round(round_id)
    assert queries(round_id) == published and len(published) == 10
    assert after.model_dump() == before.model_dump()


def test_duplicate_deliveries_at_once_publish_one_query_set(database: Engine) -> None:
    pool, _ = import_pool("digits", 200)
    round_id = add_round(pool, budget=10)
    start = threading.Barrier(3)
    ended: list[RoundStatus | None] = []

    def deliver(name: str) -> None:
        start.wait()
        ended.append(execute(round_id, name))

    threads = [threading.Thread(target=deliver, args=(f"worker-{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(ended, key=str) == [None, None, RoundStatus.ready]
    assert len(queries(round_id)) == 10 and get_round(round_id).attempts == 1


@sqlite_only
def test_a_trained_round_publishes_queries_duals_checkpoint_and_metrics(database: Engine) -> None:
    pool, labeled = labeled_pool("digits", 400, model_spec={"network": "mlp"})
    round_id = add_round(pool, budget=15, labeled=LABELED, params={"epsilon": 0.2})
    assert execute(round_id, "worker-a") == RoundStatus.ready
    round_ = get_round(round_id)
    assert round_.seeding is None and (round_.phase, round_.progress) == ("done", 1.0)
    assert {"load", "train", "embed", "dual_head", "select"} <= set(round_.timings)

    unlabeled = pool_items(pool, Split.pool) - set(labeled)
    picked = queries(round_id)
    ids = [item for _, item, _ in picked]
    assert [rank for rank, _, _ in picked] == list(range(15))
    assert len(set(ids)) == 15 and set(ids) <= unlabeled
    scores = [score for _, _, score in picked]
    assert scores == sorted(scores, reverse=True)  # ALLY ranks by predicted dual

    duals = rows(DualValue, round_id)
    measured = {d.item_id: d.value for d in duals if d.measured}
    predicted = {d.item_id: d.value for d in duals if not d.measured}
    assert set(measured) == set(labeled) and set(predicted) == unlabeled
    assert all(v >= 0 for v in measured.values()) and any(v > 0 for v in measured.values())
    assert all(np.isfinite(v) for v in predicted.values())
    assert [predicted[i] for i in ids] == pytest.approx(scores)

    [version] = rows(ModelVersion, round_id)
    checkpoint = torch.load(
        io.BytesIO(FileBlobStore(settings.blob_dir).get(version.checkpoint)), weights_only=False
    )
    metrics = round_.metrics or {}
    holdout = pool_items(pool, Split.holdout)
    assert version.metrics == metrics and metrics["labeled"] == LABELED
    assert metrics["holdout"] == len(holdout) and 0.5 < metrics["accuracy"] <= 1.0
    # The checkpoint is the network that was measured: rebuilt, it scores the same.
    model = make_network("mlp", tuple(checkpoint["input_shape"]), checkpoint["num_outputs"])
    model.load_state_dict(checkpoint["model"])
    with Session(get_engine()) as session:
        stored = session.get(Pool, pool.id)
        inputs = pipeline.load_inputs(session, stored, FileBlobStore(settings.blob_dir))  # type: ignore[arg-type]
    measured_again = evaluate(model.eval(), "classification", inputs.holdout_x, inputs.holdout_y)
    assert measured_again["accuracy"] == pytest.approx(metrics["accuracy"])
    assert checkpoint["epsilon"] == pytest.approx(0.2)


@sqlite_only
def test_a_regression_round_reports_mse_in_target_units(database: Engine) -> None:
    pool, labeled = labeled_pool("diabetes", 240)
    round_id = add_round(pool, budget=10, labeled=LABELED)
    assert execute(round_id, "worker-a") == RoundStatus.ready
    metrics = get_round(round_id).metrics or {}
    # Diabetes progression scores spread over ~25..346 (variance ~6000): a model that learned
    # nothing sits near that; anything in target units is far above standardized values.
    assert 500 < metrics["mse"] < 12_000 and metrics["holdout"] == 60
    ids = [item for _, item, _ in queries(round_id)]
    assert len(set(ids)) == 10 and set(ids) <= pool_items(pool, Split.pool) - set(labeled)
    duals = rows(DualValue, round_id)
    assert sum(d.measured for d in duals) == LABELED
    assert sum(not d.measured for d in duals) == 180 - LABELED
    assert len(rows(ModelVersion, round_id)) == 1


@sqlite_only
def test_a_round_that_keeps_failing_ends_failed_with_its_error(database: Engine) -> None:
    pool, _ = labeled_pool("digits", 100, model_spec={"training": {"max_epochs": 3}})
    # Asked for more than the pool has left unlabeled (labels arrived after it was queued).
    round_id = add_round(pool, budget=40, labeled=LABELED)
    statuses = [execute(round_id, f"worker-{n}") for n in range(settings.round_max_attempts)]
    assert statuses[:-1] == [RoundStatus.queued] * (settings.round_max_attempts - 1)
    assert statuses[-1] == RoundStatus.failed
    round_ = get_round(round_id)
    assert round_.status == RoundStatus.failed and round_.attempts == settings.round_max_attempts
    assert round_.error is not None and "budget" in round_.error
    assert execute(round_id, "worker-late") is None
    assert queries(round_id) == [] and rows(ModelVersion, round_id) == []


@sqlite_only
def test_cancel_takes_effect_between_epochs(
    database: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "round_lease_seconds", 2)  # beats every 1/3 s
    training = {"max_epochs": 100_000, "target_accuracy": 2.0}
    pool, _ = labeled_pool("digits", 300, model_spec={"network": "mlp", "training": training})
    round_id = add_round(pool, budget=5, labeled=LABELED)
    ended: list[RoundStatus | None] = []
    worker = threading.Thread(target=lambda: ended.append(execute(round_id, "worker-a")))
    worker.start()
    deadline = time.monotonic() + 60
    while get_round(round_id).phase != "train" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get_round(round_id).phase == "train"
    with Session(get_engine()) as session:  # what POST /rounds/{id}/cancel does
        session.execute(
            update(Round).where(col(Round.id) == round_id).values(status=RoundStatus.cancelled)
        )
        session.commit()
    cancelled = time.monotonic()
    worker.join(timeout=30)
    assert not worker.is_alive() and ended == [None]
    assert time.monotonic() - cancelled < 5  # 100,000 epochs would take minutes
    assert get_round(round_id).status == RoundStatus.cancelled
    assert queries(round_id) == [] and rows(ModelVersion, round_id) == []


@sqlite_only
def test_the_old_workers_publish_writes_nothing_after_a_takeover(database: Engine) -> None:
    pool, _ = labeled_pool("digits", 200, model_spec={"network": "mlp"})
    round_id = add_round(pool, budget=5, labeled=LABELED)
    assert claim(round_id, "worker-a")
    with Session(get_engine(), expire_on_commit=False) as session:
        round_, stored = session.get(Round, round_id), session.get(Pool, pool.id)
        inputs = pipeline.load_inputs(session, stored, pipeline.blobs())  # type: ignore[arg-type]
    outcome = pipeline.compute(round_, stored, inputs, Heartbeat(round_id, "worker-a"))  # type: ignore[arg-type]
    expire_lease(round_id)  # worker-a stalled before publishing; worker-b takes over
    assert claim(round_id, "worker-b")
    blobs_before = sorted(settings.blob_dir.rglob("*"))
    assert pipeline.publish(round_id, "worker-a", inputs, outcome) is None
    assert queries(round_id) == [] and rows(DualValue, round_id) == []
    assert (
        rows(ModelVersion, round_id) == [] and sorted(settings.blob_dir.rglob("*")) == blobs_before
    )
    assert get_round(round_id).status == RoundStatus.running
    assert pipeline.publish(round_id, "worker-b", inputs, outcome) == RoundStatus.ready
    assert len(queries(round_id)) == 5 and len(rows(ModelVersion, round_id)) == 1


@sqlite_only
def test_the_decoded_pool_cache_never_serves_another_databases_items(
    database: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def arrays_and_blobs() -> tuple[np.ndarray, np.ndarray]:
        """The pool's arrays as the pipeline loads them, and as its blobs decode one by one."""
        with Session(get_engine()) as session:
            stored = session.get(Pool, 1)
            assert stored is not None
            _, _, x = pipeline.pool_arrays(session, stored, pipeline.blobs())
            keys = session.exec(select(Item.sha256).where(Item.pool_id == 1).order_by(Item.id))
            decoded = np.stack([load_npy(pipeline.blobs().get(key)) for key in keys])
        return x, decoded

    pool, _ = import_pool("digits", 100)
    first, decoded = arrays_and_blobs()
    assert np.array_equal(first, decoded)
    # Items added later are decoded alone; the cached ones are reused.
    with Session(get_engine()) as session:
        more = packaged("digits")["train"].subset(np.arange(300, 350))
        import_dataset(session, pipeline.blobs(), pool, {"train": more}, source="more")
        session.commit()
    decode = pipeline._decode
    decoded_keys: list[str] = []
    monkeypatch.setattr(
        pipeline,
        "_decode",
        lambda store, fmt, key: decoded_keys.append(key) or decode(store, fmt, key),
    )
    grown, decoded = arrays_and_blobs()
    assert len(decoded_keys) == 50 and np.array_equal(grown, decoded)
    monkeypatch.setattr(pipeline, "_decode", decode)
    first = grown
    # A new database over the same data directory (say, PostgreSQL recreated, the blob volume
    # kept) numbers its pool and items from 1 again, here for other images.
    monkeypatch.setattr(settings, "database_url", f"sqlite:///{tmp_path / 'second.db'}")
    migrate(get_engine())
    import_pool("digits", 150, start=100)
    second, decoded = arrays_and_blobs()
    assert not np.array_equal(second, first)
    assert np.array_equal(second, decoded)


@sqlite_only
def test_a_round_that_cannot_run_as_stored_fails_at_once(database: Engine) -> None:
    pool, _ = labeled_pool("digits", 100, model_spec={"training": {"max_epochs": 3}})
    round_id = add_round(pool, budget=5, labeled=LABELED, strategy="random", params={"k": 3})
    assert execute(round_id, "worker-a") == RoundStatus.failed
    round_ = get_round(round_id)
    assert round_.attempts == 1  # no retries: the parameters would fail every time
    assert round_.error is not None and "RoundInputError" in round_.error and "k" in round_.error
    assert queries(round_id) == []
