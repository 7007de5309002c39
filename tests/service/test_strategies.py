"""What the service accepts against what the worker runs: strategies, networks, training."""

import dataclasses
from typing import get_args

from service.schemas import ModelSpec, TrainingSpec
from service.strategies import CLASSIFICATION_ONLY, PARAMS, STRATEGIES
from worker.ally.networks import NETWORKS
from worker.ally.pdcl import PDCLConfig
from worker.ally.registry import STRATEGIES as WORKER_STRATEGIES

# Worker fields that are configuration objects, not JSON: the API does not offer them.
NOT_OFFERED = {"ally": {"head"}}


def test_the_service_offers_exactly_the_workers_strategies() -> None:
    assert set(STRATEGIES) == set(PARAMS) == set(WORKER_STRATEGIES)


def test_classification_only_matches_the_workers_tasks() -> None:
    worker = {name for name, cls in WORKER_STRATEGIES.items() if "regression" not in cls.tasks}
    assert worker == CLASSIFICATION_ONLY


def test_each_strategys_params_are_its_dataclass_fields() -> None:
    for name, cls in WORKER_STRATEGIES.items():
        fields = (
            {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        )
        assert set(PARAMS[name].model_fields) == fields - NOT_OFFERED.get(name, set()), name


def test_training_options_are_pdcl_config_fields() -> None:
    assert set(TrainingSpec.model_fields) <= {f.name for f in dataclasses.fields(PDCLConfig)}


def test_the_networks_are_the_workers() -> None:
    network = ModelSpec.model_fields["network"].annotation
    assert set(get_args(network)) == {"auto", *NETWORKS}


def test_the_service_declares_the_workers_defaults() -> None:
    for name, cls in WORKER_STRATEGIES.items():
        if not dataclasses.is_dataclass(cls):
            continue
        worker = {f.name: f.default for f in dataclasses.fields(cls)}
        for field, info in PARAMS[name].model_fields.items():
            assert info.default == worker[field], (name, field)
