"""Learnable element-wise masks on the task vectors: the one mask of the library (Concrete
subspace learning, Tang et al. 2023).

A :class:`ConcreteMasks` module holds one logit per element of each masked parameter, shared by
all tasks (the paper) or one per task (``[T, *shape]``), init 0 (p = 0.5). While training it
draws a relaxed-Bernoulli (Concrete) sample at a temperature; at evaluation it gives a
continuous sample (the paper), the expectation σ(logit) or a hard mask (logit > 0), chosen by
``mode``. Every mask is rescaled ``m / mean(m)`` (per task for per-task masks) so the masked task
vector keeps its scale. :meth:`ConcreteMasks.freeze` fixes one sample, so that an evaluation, an
export and a later stage all see the same mask. Masks are saved compactly: logits in bfloat16, a
frozen mask as bfloat16 values (see :meth:`ConcreteMasks.state_tensors`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from adamerge.errors import InputError

MODES = ("sample", "expectation", "hard")


def concrete_sample(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """A relaxed-Bernoulli sample ``σ((logit + log u − log(1 − u)) / temperature)``, u ~ U(0, 1)."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float32).to(logits.device).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def rescale(mask: Tensor, per_task: bool) -> Tensor:
    """``m / mean(m)``: over the whole tensor, or per task (dim 0) for per-task masks."""
    if per_task:
        mean = mask.reshape(mask.shape[0], -1).mean(1).clamp_min(1e-12)
        return mask / mean.reshape(-1, *([1] * (mask.dim() - 1)))
    return mask / mask.mean().clamp_min(1e-12)


def mask_values(logits: Tensor, mode: str, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """Mask values (before rescaling) for ``mode``: a Concrete sample, σ(logit) or logit > 0."""
    if mode == "sample":
        return concrete_sample(logits, temperature, generator)
    if mode == "expectation":
        return torch.sigmoid(logits)
    if mode == "hard":
        return (logits > 0).to(logits.dtype)
    raise InputError(f"mask mode must be one of {MODES}, got {mode!r}")


class ConcreteMasks(nn.Module):
    """Learnable masks for ``keys`` (parameter names with their shapes) over ``num_tasks`` tasks.

    Calling the module returns ``{name: rescaled mask}`` for :meth:`MergedModel.merged_parameters`:
    a fresh Concrete sample in training mode, the evaluation ``mode`` otherwise, or the frozen
    sample after :meth:`freeze`.
    """

    def __init__(self, shapes: dict[str, torch.Size], num_tasks: int, per_task: bool = False,
                 temperature: float = 0.5, eval_mode: str = "sample", init_logit: float = 0.0, seed: int = 0,
                 end_temperature: float | None = None) -> None:
        super().__init__()
        if not shapes:
            raise InputError("ConcreteMasks: no parameters to mask")
        if eval_mode not in MODES:
            raise InputError(f"mask eval mode must be one of {MODES}, got {eval_mode!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise InputError(f"mask temperature must be > 0, got {temperature!r}")
        self.keys = list(shapes)
        self.per_task, self.temperature, self.eval_mode = per_task, float(temperature), eval_mode
        self.logits = nn.ParameterList(
            nn.Parameter(torch.full(((num_tasks,) if per_task else ()) + tuple(shapes[k]), float(init_logit)))
            for k in self.keys
        )
        self.seed = seed
        self.start_temperature, self.end_temperature = self.temperature, end_temperature
        self.frozen: dict[str, Tensor] | None = None
        self._step, self._draws = 0, 0

    def set_step(self, step: int, fraction: float | None = None) -> None:
        """Samples are a function of (seed, step, draw within the step), so a resumed run draws
        what an uninterrupted one would; with ``end_temperature`` the temperature anneals
        linearly from its start value as ``fraction`` (of the run) goes from 0 to 1."""
        self._step, self._draws = int(step), 0
        if self.end_temperature is not None and fraction is not None:
            frac = min(1.0, max(0.0, fraction))
            self.temperature = self.start_temperature + (self.end_temperature - self.start_temperature) * frac

    def _generator(self) -> torch.Generator:
        self._draws += 1
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self._step) * 64 + self._draws)

    def forward(self) -> dict[str, Tensor]:
        if self.frozen is not None:
            return self.frozen
        mode = "sample" if self.training else self.eval_mode
        gen = self._generator() if mode == "sample" else None
        return {k: rescale(mask_values(p, mode, self.temperature, gen), self.per_task) for k, p in zip(self.keys, self.logits)}

    @torch.no_grad()
    def freeze(self, mode: str | None = None, seed: int | None = None) -> dict[str, Tensor]:
        """Fix one mask (``mode``, default the evaluation mode; a sample drawn from ``seed``)."""
        mode = mode or self.eval_mode
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        # rounded to bfloat16 now, so the model that is scored is the one that is saved and exported
        self.frozen = {
            k: rescale(mask_values(p.detach(), mode, self.temperature, gen), self.per_task).to(torch.bfloat16).float()
            for k, p in zip(self.keys, self.logits)
        }
        return self.frozen

    def unfreeze(self) -> None:
        self.frozen = None

    @torch.no_grad()
    def density(self) -> float:
        """Expected fraction of kept elements, mean σ(logit) over every masked element."""
        total = sum(p.numel() for p in self.logits)
        return float(sum(torch.sigmoid(p).sum() for p in self.logits) / total)

    def state_tensors(self) -> dict[str, Tensor]:
        """Compact state: logits (and the frozen mask, if any) in bfloat16."""
        out = {f"mask_logit.{k}": p.detach().to(torch.bfloat16) for k, p in zip(self.keys, self.logits)}
        if self.frozen is not None:
            out.update({f"mask_frozen.{k}": v.to(torch.bfloat16) for k, v in self.frozen.items()})
        return out

    @torch.no_grad()
    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        for k, p in zip(self.keys, self.logits):
            if f"mask_logit.{k}" in state:
                p.copy_(state[f"mask_logit.{k}"].float())
        frozen = {k: state[f"mask_frozen.{k}"].float() for k in self.keys if f"mask_frozen.{k}" in state}
        self.frozen = frozen or None
