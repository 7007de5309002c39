"""Schema fuzzing: schemathesis generates requests from the service's own OpenAPI, valid and
invalid, as an admin and as an annotator, on a seeded database; every answer must be a
documented status, content type and body, and never a 5xx."""

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlmodel import Session, select

from service.auth import create_key
from service.blobs import FileBlobStore
from service.models import ApiKey, InputKind, Role, RoundStatus, Task
from tests.service.factories import make_items, make_label, make_pool, make_round

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Per operation, role and mode (valid or invalid data): 20 operations x 2 roles x 2 modes
# x up to 20 examples; operations with little to vary (GET /healthz) run fewer. About 1,370
# requests in all, 20 to 35 s per database on this 2-core machine.
EXAMPLES = 20
MIN_REQUESTS = 1000
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    # Shrinking a failure can take minutes; the failing request is reported as generated.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@dataclass
class Seeded:
    """Ids of the rows the fuzzer may hit, by path parameter name."""

    ids: dict[str, list[int]] = field(default_factory=dict)
    # The fuzzer's own keys: revoking them would turn every later request into a 401.
    own_keys: set[int] = field(default_factory=set)


@pytest.fixture
def seeded(
    session: Session, blobs: FileBlobStore, admin: dict[str, str], annotator: dict[str, str]
) -> Seeded:
    """A digit pool with a ready round and labels, a regression pool with a queued round, an
    empty pool, and a spare annotator key the fuzzer may revoke."""
    digits = make_pool(session)
    images = make_items(session, blobs, digits, 12)
    ready = make_round(session, digits, queried=images[:6], metrics={"accuracy": 0.5})
    for item in images[:3]:
        make_label(session, item, "3", round_id=ready.id)
    regression = make_pool(session, task=Task.regression, input_kind=InputKind.vector)
    vectors = make_items(session, blobs, regression, 8)
    queued = make_round(session, regression, queried=vectors[:4], status=RoundStatus.queued)
    empty = make_pool(session)
    spare, _ = create_key(session, name="spare", role=Role.annotator)
    return Seeded(
        ids={
            "pool_id": [digits.id, regression.id, empty.id],  # type: ignore[list-item]
            "item_id": [i.id for i in (*images[:2], *images[-2:], *vectors[:2])],  # type: ignore[misc]
            "round_id": [ready.id, queued.id],  # type: ignore[list-item]
            "key_id": [spare.id],  # type: ignore[list-item]
        },
        own_keys=set(session.exec(select(ApiKey.id).where(ApiKey.id != spare.id))),
    )


def _cases(
    operation: APIOperation, mode: GenerationMode, seeded: Seeded
) -> st.SearchStrategy[Case]:
    """Generated cases; valid ones also aim their ids at seeded rows half of the time."""
    generated = operation.as_strategy(generation_mode=mode)
    names = [p.name for p in operation.path_parameters]
    if mode != GenerationMode.POSITIVE or not names:
        return generated
    [name] = names
    aimed = [
        operation.as_strategy(generation_mode=mode, path_parameters={name: id_})
        for id_ in seeded.ids[name]
    ]
    return st.one_of(generated, st.one_of(*aimed))


def _modes(operation: APIOperation) -> list[GenerationMode]:
    """Valid requests, and invalid ones where there is an input to get wrong."""
    has_input = any((operation.path_parameters, operation.query, operation.body))
    return list(GenerationMode) if has_input else [GenerationMode.POSITIVE]


def _not_own_key(seeded: Seeded) -> Callable[[Case], bool]:
    """Leave out revoking the fuzzer's own keys (the spare key and new ones it may revoke)."""

    def keep(case: Case) -> bool:
        key_id = (case.path_parameters or {}).get("key_id")
        return key_id not in seeded.own_keys

    return keep


def _schema(app: FastAPI, headers: dict[str, str]) -> BaseSchema:
    """The app's OpenAPI, with every request signed by the key in `headers`."""
    config = schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"HTTPBearer": {"bearer": headers["Authorization"].split()[1]}}},
            "generation": {
                # Like most HTTP APIs, this one ignores query parameters it does not know, and
                # OpenAPI does not forbid them: sending some would prove nothing.
                "allow-extra-parameters": False,
                # Every request carries the role's key: requests without one or with a revoked
                # one are test_auth.py's matrix, and here would only spend the budget on 401s.
                "with-security-parameters": False,
            },
        }
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


def _fuzz(operation: APIOperation, mode: GenerationMode, seeded: Seeded) -> list[int]:
    """Send the generated requests, check each answer, and return their status codes."""
    statuses: list[int] = []

    @FUZZ_SETTINGS
    @given(case=_cases(operation, mode, seeded).filter(_not_own_key(seeded)))
    def run(case: Case) -> None:
        statuses.append(case.call_and_validate(checks=CHECKS).status_code)

    run()
    return statuses


def test_the_api_answers_generated_requests_as_its_schema_says(
    app: FastAPI, seeded: Seeded, admin: dict[str, str], annotator: dict[str, str]
) -> None:
    statuses: dict[str, list[int]] = {}
    for role, headers in (("admin", admin), ("annotator", annotator)):
        schema = _schema(app, headers)
        statuses[role] = [
            status
            for result in schema.get_all_operations()
            for mode in _modes(result.ok())
            for status in _fuzz(result.ok(), mode, seeded)
        ]
    requests = {role: len(sent) for role, sent in statuses.items()}
    assert sum(requests.values()) >= MIN_REQUESTS, requests
    assert min(requests.values()) >= MIN_REQUESTS // 3, requests
    # The keys worked: each role got past authentication and was served, not only refused.
    for role, sent in statuses.items():
        assert any(200 <= status < 300 for status in sent), role
