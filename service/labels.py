"""What POST /labels stores: each request checked on its own, the new labels of all the
requests that arrived together decided at once.

No SQL here: service/label_writer.py reads what `plan_labels` needs (`Known`) and writes
the labels it plans.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.auth import Caller
from service.errors import Forbidden, InvalidLabel, ItemNotFound, ServiceError
from service.models import Role, Task, utcnow
from service.schemas import LabelCreate, LabelsCreated

Pair = tuple[int, str]  # (item id, annotator)
Wanted = tuple[int, str | float, int | None, str]  # (item id, answer, round id, annotator)


@dataclass(frozen=True)
class LabelRequest:
    """One POST /labels: who sends it and what."""

    key: Caller
    inputs: Sequence[LabelCreate]


@dataclass
class KnownItem:
    """An item as the checks see it."""

    pool_id: int
    task: str
    classes: list[str] | None
    rounds: set[int] = field(default_factory=set)  # the rounds that queried it


@dataclass
class Known:
    """What the database holds about a batch's items: those that exist, and each
    annotator's latest label of them (a dict shaped as LabelPublic)."""

    items: dict[int, KnownItem]
    current: dict[Pair, dict[str, Any]]


@dataclass
class Stored:
    """Each request's answer, or the error that refused it, and the rounds whose GET
    /queries pages the new labels changed (those that queried their items)."""

    answers: list[LabelsCreated | ServiceError]
    rounds: set[int]


@dataclass
class Planned:
    """What `plan_labels` decided, before anything is written: each request's labels and
    count of new ones, or the error refusing it."""

    decided: list[tuple[list[dict[str, Any]], int] | ServiceError]
    created: list[dict[str, Any]]  # the new labels, to insert in this order
    rounds: set[int]  # the rounds that queried the new labels' items

    def stored(self, ids: Sequence[int]) -> Stored:
        """The answers, once the new labels are stored with these ids (in their order)."""
        for label, label_id in zip(self.created, ids, strict=True):
            label["id"] = label_id
        return Stored(
            [
                answer
                if isinstance(answer, ServiceError)
                else LabelsCreated.model_validate({"data": answer[0], "created": answer[1]})
                for answer in self.decided
            ],
            self.rounds,
        )


def annotator(label: LabelCreate, key: Caller) -> str:
    return label.annotator or key.name


def pairs(requests: Sequence[LabelRequest]) -> list[Pair]:
    """The (item, annotator) pairs the requests answer, each once."""
    return list(
        dict.fromkeys(
            (label.item_id, annotator(label, request.key))
            for request in requests
            for label in request.inputs
        )
    )


def plan_labels(requests: Sequence[LabelRequest], known: Known) -> Planned:
    """Each request's labels, or the error that refuses it as a whole; one refused request
    leaves the others alone. Repeating an annotator's current label adds none, and requests
    see each other's labels in arrival order."""
    checked: list[list[Wanted] | ServiceError] = []
    for request in requests:
        try:
            checked.append(_check(request, known.items))
        except ServiceError as error:
            checked.append(error)

    current = dict(known.current)
    now = utcnow()
    created: list[dict[str, Any]] = []
    decided: list[tuple[list[dict[str, Any]], int] | ServiceError] = []
    for wanted in checked:
        if isinstance(wanted, ServiceError):
            decided.append(wanted)
            continue
        results, new = [], 0
        for item_id, answer, round_id, name in wanted:
            label = current.get((item_id, name))
            if label is None or label["value"] != answer:
                label = {
                    "item_id": item_id,
                    "pool_id": known.items[item_id].pool_id,
                    "value": answer,
                    "annotator": name,
                    "round_id": round_id,
                    "created_at": now,
                }
                created.append(label)
                current[(item_id, name)] = label
                new += 1
            results.append(label)
        decided.append((results, new))
    rounds = {round_id for label in created for round_id in known.items[label["item_id"]].rounds}
    return Planned(decided, created, rounds)


def _check(request: LabelRequest, items: dict[int, KnownItem]) -> list[Wanted]:
    """The labels `request` asks for; a ServiceError when any of them is refused."""
    key = request.key
    pools = key.pools

    def exists(item_id: int) -> bool:
        # To a key restricted to some pools, the items of the others do not exist.
        return item_id in items and (pools is None or items[item_id].pool_id in pools)

    missing = sorted({i.item_id for i in request.inputs if not exists(i.item_id)})
    if missing:
        raise ItemNotFound(f"no items {missing}")
    wanted = []
    for i in request.inputs:
        item = items[i.item_id]
        answer = _answer(i.value, item.task, item.classes, i.item_id)
        if i.round_id is not None and i.round_id not in item.rounds:
            raise InvalidLabel(f"item {i.item_id} was not queried by round {i.round_id}")
        round_id = i.round_id if i.round_id is not None else max(item.rounds, default=None)
        if round_id is None and key.role != Role.admin:
            raise Forbidden(
                f"item {i.item_id} was not queried by any round; only admins give seed labels"
            )
        wanted.append((i.item_id, answer, round_id, annotator(i, key)))
    return wanted


def _answer(value: str | float, task: str, classes: list[str] | None, item_id: int) -> str | float:
    """The value as stored: a class name of the pool, or a finite regression target."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidLabel(f"item {item_id}: a label must be a finite number, not {value}")
    if task == Task.regression:
        if isinstance(value, str):
            raise InvalidLabel(f"item {item_id}: a regression label is a number, not {value!r}")
        return float(value)
    assert classes is not None
    # Accept 7 for the class "7": annotation tools often send digit classes as numbers.
    name = value if isinstance(value, str) else (str(int(value)) if value == int(value) else "")
    if name not in classes:
        raise InvalidLabel(f"item {item_id}: {value!r} is not a class of its pool {classes}")
    return name
