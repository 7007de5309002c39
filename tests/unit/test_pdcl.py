"""PDCL (Algorithm 1): the dual update, the constraint level, and what the duals single out."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from worker.ally.networks import MLP
from worker.ally.pdcl import EpochRecord, PDCLConfig, dual_step, train


def _frozen_linear(logits: torch.Tensor) -> MLP:
    """An MLP whose every output is `logits` whatever the input (weights zero, bias = logits)."""
    model = MLP(in_features=2, num_outputs=logits.shape[-1], hidden=2, depth=1)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.head.bias.copy_(logits)
    return model


def test_dual_step_is_projected_ascent():
    duals = torch.tensor([0.0, 0.5, 0.1, 2.0])
    slack = torch.tensor([1.0, -0.2, -1.0, 0.5])
    assert torch.allclose(dual_step(duals, slack, 0.1), torch.tensor([0.1, 0.48, 0.0, 2.05]))


def test_duals_accumulate_slack_exactly_as_algorithm_1():
    # Frozen model (η_p = 0): each sample's loss is the same every epoch, so after E epochs
    # Algorithm 1 gives λ_i = [λ0 + Σ_t η_d / t^p · (ℓ_i − ε)]₊ with the projection at each step.
    logits = torch.tensor([2.0, 0.0, -1.0])
    y = torch.tensor([0, 1, 2, 1])
    losses = torch.nn.functional.cross_entropy(logits.expand(4, 3), y, reduction="none")
    epsilon, dual_lr, power, epochs, lambda_init = 1.0, 0.3, 0.5, 5, 0.2
    config = PDCLConfig(
        epsilon=epsilon,
        dual_lr=dual_lr,
        dual_lr_power=power,
        lambda_init=lambda_init,
        primal_lr=0.0,
        batch_size=1,
        max_epochs=epochs,
        target_accuracy=2.0,  # never reached: run the whole schedule
    )
    ids = np.array([40, 10, 30, 20])
    result = train(_frozen_linear(logits), torch.zeros(4, 2), y, ids, "classification", config, 0)

    expected = torch.full((4,), lambda_init)
    for t in range(1, epochs + 1):
        expected = (expected + dual_lr / t**power * (losses - epsilon)).clamp(min=0)
    assert result.ids.tolist() == ids.tolist()
    np.testing.assert_allclose(result.duals, expected.numpy(), rtol=1e-5)
    assert result.duals_by_id()[10] == pytest.approx(float(expected[1]), rel=1e-5)
    assert len(result.history) == epochs
    # Sample 0 is well fit (loss < ε): its dual was projected to zero; the others grew.
    assert result.duals[0] == 0 and (result.duals[1:] > lambda_init).all()


def _digits(n: int = 600, seed: int = 0):
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))[:n]
    x = torch.tensor(data.data[order], dtype=torch.float32) / 16
    return x, torch.tensor(data.target[order]), np.arange(n) * 7 + 3


def test_huge_epsilon_zeroes_every_dual_and_equals_unconstrained_training():
    x, y, ids = _digits(300)
    runs = {}
    for epsilon in (20.0, None):  # 20 nats: every slack negative (paper §5.4)
        torch.manual_seed(0)
        config = PDCLConfig(epsilon=epsilon, max_epochs=5)
        runs[epsilon] = train(MLP(64, 10), x, y, ids, "classification", config, seed=0)
    assert (runs[20.0].duals == 0).all()
    assert runs[20.0].history[-1].active_share == 0
    for a, b in zip(runs[20.0].model.parameters(), runs[None].model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_tight_epsilon_gives_mislabeled_samples_the_largest_duals():
    x, y, ids = _digits(600)
    flipped = np.arange(0, 600, 40)  # 15 samples with a wrong label
    y = y.clone()
    y[flipped] = (y[flipped] + 1 + torch.arange(len(flipped)) % 9) % 10
    torch.manual_seed(0)
    config = PDCLConfig(epsilon=0.05, max_epochs=30, target_accuracy=2.0)
    result = train(MLP(64, 10), x, y, ids, "classification", config, seed=0)
    top = set(np.argsort(-result.duals)[: len(flipped)].tolist())
    assert len(top & set(flipped.tolist())) >= 0.8 * len(flipped)


def test_far_off_regression_target_gets_the_largest_dual():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(200, 5)), dtype=torch.float32)
    y = x @ torch.tensor([1.0, -0.5, 0.3, 0.0, 0.8])
    y[17] += 6.0  # about six standard deviations off the rest
    y = (y - y.mean()) / y.std()
    torch.manual_seed(0)
    config = PDCLConfig(epsilon=0.1, max_epochs=40)
    result = train(MLP(5, 1), x, y, np.arange(200), "regression", config, seed=0)
    assert int(np.argmax(result.duals)) == 17


def test_auto_epsilon_is_a_multiple_of_the_unconstrained_loss():
    x, y, ids = _digits(200)
    torch.manual_seed(0)
    config = PDCLConfig(max_epochs=4, target_accuracy=2.0)
    plain = train(MLP(64, 10), x, y, ids, "classification", config, seed=1)
    torch.manual_seed(0)
    auto = PDCLConfig(epsilon="auto", epsilon_scale=1.2, max_epochs=4, target_accuracy=2.0)
    result = train(MLP(64, 10), x, y, ids, "classification", auto, seed=1)
    np.testing.assert_allclose(result.epsilon, 1.2 * plain.history[-1].loss, rtol=1e-4)


def test_the_calibration_run_reports_its_epochs_and_can_be_stopped():
    x, y, ids = _digits(100)
    auto = PDCLConfig(epsilon="auto", max_epochs=3, target_accuracy=2.0)
    seen: list[tuple[bool, int]] = []
    train(MLP(64, 10), x, y, ids, "classification", auto, seed=0,
          on_epoch=lambda r: seen.append((r.calibration, r.epoch)))  # fmt: skip
    assert seen == [(True, 1), (True, 2), (True, 3), (False, 1), (False, 2), (False, 3)]

    class Cancelled(Exception):
        pass

    def cancel(record: EpochRecord) -> None:
        raise Cancelled  # how the worker's heartbeat stops a cancelled round

    with pytest.raises(Cancelled):
        train(MLP(64, 10), x, y, ids, "classification", auto, seed=0, on_epoch=cancel)


def test_holdout_stopping_keeps_the_holdout_out_of_the_constraints():
    x, y, ids = _digits(300)
    config = PDCLConfig(epsilon=0.2, holdout_fraction=0.2, patience=2, max_epochs=50)
    result = train(MLP(64, 10), x, y, ids, "classification", config, seed=0)
    assert len(result.ids) == 240 and set(result.ids) < set(ids)
    assert all(r.holdout_loss is not None for r in result.history)
    assert result.best_epoch <= len(result.history)
    best = min(r.holdout_loss for r in result.history)
    assert result.history[result.best_epoch - 1].holdout_loss == best


def test_same_seed_same_duals():
    x, y, ids = _digits(200)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(train(MLP(64, 10), x, y, ids, "classification", PDCLConfig(0.2), seed=3))
    np.testing.assert_array_equal(runs[0].duals, runs[1].duals)


class _Scale(MLP):
    """f(x) = w·x with one weight: small enough to follow Algorithm 1 by hand."""

    def __init__(self, w: float):
        super().__init__(in_features=1, num_outputs=1, hidden=1, depth=0)
        with torch.no_grad():
            self.head.weight.fill_(w)
            self.head.bias.zero_()
        self.head.bias.requires_grad_(False)


def test_slacks_are_measured_after_the_primal_step():
    # One batch, one epoch: Adam's first step moves w by exactly lr against the gradient's
    # sign, and Algorithm 1 then measures ℓ' at the new w (not at the old one).
    x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([3.0, 5.0])
    w0, lr, dual_lr, epsilon = 1.0, 0.5, 0.1, 0.5
    config = PDCLConfig(epsilon=epsilon, dual_lr=dual_lr, primal_lr=lr, batch_size=2, max_epochs=1)
    result = train(_Scale(w0), x, y, np.array([7, 8]), "regression", config, seed=0)
    w1 = w0 + lr  # the loss falls as w grows towards 2.5
    expected = np.maximum(0.0, dual_lr * (((w1 * x[:, 0] - y) ** 2).numpy() - epsilon))
    np.testing.assert_allclose(result.duals, expected, rtol=1e-5)
    assert float(result.model.head.weight) == pytest.approx(w1)
