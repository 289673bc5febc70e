"""The objectives: values against hand computations, gradients, and the infomax floor."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adamerge.errors import InputError
from adamerge.train.objectives import OBJECTIVES, get_objective, infomax, shannon_entropy


def _hand_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), -1)
    return -(p * p.log()).sum(-1)


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2


def test_entropy_matches_hand_computation(logits):
    assert torch.allclose(shannon_entropy(logits).double(), _hand_entropy(logits), atol=1e-6)
    assert torch.allclose(get_objective("entropy")(logits).double(), _hand_entropy(logits).mean(), atol=1e-6)
    norm = get_objective("entropy_norm")(logits).double()
    assert torch.allclose(norm, _hand_entropy(logits).mean() / math.log(5), atol=1e-6)


def test_reliable_entropy_keeps_only_confident_samples(logits):
    h = _hand_entropy(logits)
    margin = 0.4 * math.log(5)
    keep = h < margin
    assert 0 < keep.sum() < len(h), "the fixture must mix confident and unsure samples"
    expected = (torch.exp(-(h - margin)) * h * keep).sum() / len(h)
    assert torch.allclose(get_objective("reliable_entropy")(logits).double(), expected, atol=1e-6)


def test_infomax_is_shot_information_maximisation(logits):
    p_bar = torch.softmax(logits, -1).mean(0)
    marginal = -(p_bar * p_bar.log()).sum()
    log_c = math.log(5)
    expected = (_hand_entropy(logits).mean() + log_c - marginal) / log_c
    assert torch.allclose(infomax(logits).double(), expected, atol=1e-6)
    half = (_hand_entropy(logits).mean() + 0.5 * (log_c - marginal)) / log_c
    assert torch.allclose(infomax(logits, diversity=0.5).double(), half, atol=1e-6)


def test_infomax_floor_leaves_a_skewed_but_diverse_balance_alone():
    # confident predictions over 3 classes in a 50/25/25 balance: H(p̄) ≈ 0.95 log 3 > 0.9 log 3
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    logits = (F.one_hot(labels, 3).double() * 6.0).requires_grad_()
    floored = infomax(logits, floor=0.9)
    assert torch.allclose(floored.double(), get_objective("entropy_norm")(logits).double(), atol=1e-6)
    # the uniform-marginal term of full infomax would push this balance towards 33/33/33
    assert infomax(logits, floor=1.0) > floored + 1e-3


def test_infomax_floor_penalises_a_collapse_and_its_gradient_undoes_it():
    collapsed = torch.tensor([[4.0, 0.0, 0.0]] * 6 + [[0.0, 2.0, 0.0]] * 2, dtype=torch.float64, requires_grad=True)
    loss = infomax(collapsed, floor=0.9)
    assert loss > get_objective("entropy_norm")(collapsed).double() + 1e-3
    loss.backward()
    stepped = collapsed.detach() - 0.5 * collapsed.grad
    p_before = torch.softmax(collapsed.detach(), -1).mean(0)
    p_after = torch.softmax(stepped, -1).mean(0)
    entropy_of = lambda p: -(p * p.log()).sum()  # noqa: E731
    assert entropy_of(p_after) > entropy_of(p_before)


def test_infomax_floor_must_be_a_fraction(logits):
    with pytest.raises(InputError, match="floor"):
        infomax(logits, floor=1.5)


def test_cross_entropy_needs_labels(logits):
    with pytest.raises(InputError, match="labels"):
        get_objective("cross_entropy")(logits)
    labels = torch.arange(12) % 5
    assert torch.allclose(get_objective("cross_entropy")(logits, labels), F.cross_entropy(logits.float(), labels))


def test_unknown_objective_names_the_choices():
    with pytest.raises(InputError, match="infomax"):
        get_objective("nope")


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_is_a_differentiable_scalar(name, logits):
    labels = torch.arange(12) % 5
    x = logits.clone().requires_grad_()
    kind = getattr(OBJECTIVES[name], "target_kind", None)
    # an objective that also needs the starting merge's predictions takes [N, 2, C] targets
    shape = (12, 2, 5) if getattr(OBJECTIVES[name], "needs_start", False) else (12, 5)
    extra = {"targets": 20 * torch.randn(*shape, generator=torch.Generator().manual_seed(3))} if kind in ("experts", "views") else {}
    value = OBJECTIVES[name](x, labels, **extra)
    assert value.dim() == 0 and torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
