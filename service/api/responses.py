"""JSON answers serialized in the handler, for the routes that must be fast."""

from fastapi import Response
from pydantic import BaseModel


def json_response(body: bytes | str, status_code: int = 200) -> Response:
    """JSON serialized already (a model's, or a kept page): FastAPI need not validate it."""
    return Response(body, status_code=status_code, media_type="application/json")


def model_json(model: BaseModel, status_code: int = 200) -> Response:
    """`model` as the JSON FastAPI would send for it as a `response_model` (pydantic's own
    serializer), without FastAPI validating it once more (for a sync handler, another trip
    through the thread pool)."""
    return json_response(model.model_dump_json(), status_code)
