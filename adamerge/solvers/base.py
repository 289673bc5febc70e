"""The solver registry and the contract every solver follows.

A solver owns how a method's parameters move. Two kinds:

- data solvers (``needs_data = True``) run inside Lightning with manual optimisation: the
  LightningModule (:class:`adamerge.train.loop.MergeModule`) hands each step's batch to
  :meth:`Solver.training_step`, which computes the loss through ``module.batch_loss``, runs
  ``module.manual_backward`` once and steps exactly ONE Lightning optimiser once (so
  ``trainer.global_step`` counts steps, which the data index and ``--resume`` rely on). Their
  state lives in that optimiser's ``state_dict`` and is checkpointed by Lightning.
- data-free solvers (``needs_data = False``) run :meth:`Solver.solve` on the task vectors and
  return method state (tensors saved in the run folder); no Trainer, no data.

Solvers never import the LightningModule's module; the module object is duck-typed.
Each solver declares its options as a dataclass (``Options``), filled from ``options.solver_args``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

from adamerge.checks import parse_options as _parse_options
from adamerge.errors import InputError
from adamerge.registry import Registry


@dataclasses.dataclass
class NoOptions:
    """A solver without options of its own."""


def parse_options(cls: type, values: dict | None, owner: str) -> Any:
    """``cls(**values)`` through the one typed parser (:func:`adamerge.checks.parse_options`):
    unknown keys get a did-you-mean, every value is checked by its field's type and range."""
    return _parse_options(cls, values, owner)


def closure_loss(closure):
    """The loss of an optimiser's optional closure, evaluated with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


@torch.no_grad()
def start_feasible(merged, cfg) -> None:
    """Project the starting coefficients onto the constraint set (solvers whose iterates must
    all be feasible, with nothing clamped in the forward)."""
    from adamerge.solvers.projections import project

    merged.coefficients.copy_(project(merged.coefficients, cfg.constraint, cfg.bounds, cfg.total))


class Solver:
    """Base solver. Subclasses set ``name`` (by :func:`register_solver`), ``Options``,
    ``needs_data``, ``constraints`` (the ``options.constraint`` values they accept)."""

    name = "base"
    Options: type = NoOptions
    needs_data = True
    constraints: tuple[str, ...] = ("none", "box", "simplex")
    batches_per_step = 1  # batches a data step consumes (a bi-level step: 2)
    needs_masks = False  # trains learnable masks (only methods with masks can use it)
    description = ""

    def __init__(self, cfg, args: dict | None = None) -> None:
        self.cfg = cfg
        self.args = parse_options(self.Options, cfg.solver_args if args is None else args, f"solver '{self.name}'")
        if cfg.constraint not in self.constraints:
            raise InputError(
                f"solver '{self.name}' does not support constraint '{cfg.constraint}'; it supports {list(self.constraints)}"
            )

    # ---------------------------------------------------------------- how the constraint enters the model
    def parametrisation(self) -> dict:
        """Keyword arguments for :class:`~adamerge.core.merged.MergedModel`: how the constraint is
        applied in the forward (default: none; projection-based solvers keep it that way)."""
        return {"clamp": None, "simplex": False}

    def prepare(self, merged) -> None:
        """Called once on a freshly built merged model before training (e.g. make the start feasible)."""

    # ---------------------------------------------------------------- data solvers (Lightning)
    def configure_optimizers(self, module):
        raise NotImplementedError

    def training_step(self, module, batch) -> Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- data-free solvers
    def solve(self, problem) -> dict[str, Tensor]:
        """Data-free: return method state (tensors) for ``method.build(..., state=...)``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Solver state kept in Lightning checkpoints besides the optimiser's (plain values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s values on resume."""

    def summary(self, module=None) -> dict:
        """Solver facts for ``results.json`` (name, constraint, options; e.g. FW's final gap)."""
        return {
            "name": self.name,
            "constraint": self.cfg.constraint,
            "bounds": list(self.cfg.bounds),
            "total": self.cfg.total,
            "args": dataclasses.asdict(self.args),
        }


SOLVERS: Registry[type[Solver]] = Registry("solver")


def register_solver(name: str) -> Callable[[type[Solver]], type[Solver]]:
    """Class decorator: ``@register_solver("pgd")``. A duplicate name is an error."""
    return SOLVERS.decorator(name)


def list_solvers(needs_data: bool | None = None) -> list[str]:
    """Registered solver names (optionally only data or only data-free ones)."""
    return sorted(n for n, c in SOLVERS.items() if needs_data is None or c.needs_data == needs_data)


def solver_class(name: str) -> type[Solver]:
    return SOLVERS.get(name)


def create_solver(name: str, cfg, args: dict | None = None) -> Solver:
    """The solver ``name`` configured by a :class:`~adamerge.methods.MethodConfig` (its own
    options from ``args``, default ``cfg.solver_args``)."""
    return solver_class(name)(cfg, args)
