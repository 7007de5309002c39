import io
from typing import Literal

from fastapi import APIRouter, Response
from sqlmodel import col, select

from service.api.deps import AdminDep, SessionDep
from service.crud import get_pool
from service.errors import PoolNotFound, responses
from service.models import Round, RoundStatus, Task
from service.schemas import CurvePoint, LearningCurve, RowId

router = APIRouter(tags=["rounds"])

METRIC = {Task.classification: "accuracy", Task.regression: "mse"}


def _plot(curve: LearningCurve, title: str) -> bytes:
    # Imported here: matplotlib is slow to import and only this route needs it.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
    for strategy in sorted({p.strategy for p in curve.points}):
        points = [p for p in curve.points if p.strategy == strategy and p.value is not None]
        axes.plot([p.labeled for p in points], [p.value for p in points], "o-", label=strategy)
    axes.set_xlabel("labeled items")
    axes.set_ylabel(curve.metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if curve.points:
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


@router.get(
    "/pools/{pool_id}/learning-curve",
    response_model=LearningCurve,
    responses={
        **responses(PoolNotFound),
        200: {
            "content": {"application/json": {}, "image/png": {}},
            "description": "The points as JSON, or a plot with ?format=png.",
        },
    },
)
def read_learning_curve(
    *, session: SessionDep, key: AdminDep, pool_id: RowId, format: Literal["json", "png"] = "json"
) -> LearningCurve | Response:
    """The holdout metric after each ready round, against the number of labeled items."""
    pool = get_pool(session, pool_id)
    metric = METRIC[Task(pool.task)]
    rounds = session.exec(
        select(Round)
        .where(Round.pool_id == pool_id, Round.status == RoundStatus.ready)
        .order_by(col(Round.number))
    ).all()
    points = []
    for r in rounds:
        metrics = r.metrics or {}
        value = metrics.get(metric)
        points.append(
            CurvePoint(
                round_id=r.id,  # type: ignore[arg-type]
                number=r.number,
                strategy=r.strategy,
                labeled=int(metrics.get("labeled", r.labeled_at_start)),
                value=None if value is None else float(value),
            )
        )
    curve = LearningCurve(pool_id=pool_id, metric=metric, points=points)
    if format == "png":
        return Response(
            _plot(curve, f"{pool.name}: {metric} on the holdout"), media_type="image/png"
        )
    return curve
