"""Strategy names, as the API and the benchmark spell them, mapped to their classes."""

from worker.ally.baselines import BADGE, Coreset, EntropySampling, MarginSampling
from worker.ally.select import Ally
from worker.ally.strategies import RandomSampling, Strategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Ally, RandomSampling, EntropySampling, MarginSampling, BADGE, Coreset)
}


def get_strategy(name: str, **params) -> Strategy:
    """The strategy called `name`, built with `params`; the error lists the valid names."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}"
        ) from None
    return cls(**params)
