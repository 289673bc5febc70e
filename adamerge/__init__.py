"""adamerge: learn how to merge fine-tuned models from unlabeled data.

The public API: :class:`TaskVectors` (stacked task vectors), :class:`MergedModel` (the functional
merged model), the method registry (``list_methods``, ``create_method``), data-free baselines
(``build_data_free``) and ``fit`` / ``evaluate`` (Lightning training and scoring).
"""
from adamerge._compat import ensure_torchvision

ensure_torchvision()

__version__ = "0.1.0"

from adamerge.errors import AdamergeError, InputError, NonFiniteLossError  # noqa: E402
from adamerge.core.task_vectors import TaskVectors  # noqa: E402
from adamerge.core.granularity import make_grouping  # noqa: E402
from adamerge.core.merged import MergedModel  # noqa: E402
from adamerge.methods import build_data_free, create_method, list_methods, register_method  # noqa: E402

__all__ = [
    "AdamergeError",
    "InputError",
    "NonFiniteLossError",
    "TaskVectors",
    "MergedModel",
    "make_grouping",
    "build_data_free",
    "create_method",
    "list_methods",
    "register_method",
    "__version__",
]


def __getattr__(name: str):
    # Lightning is imported only when training is used
    if name == "fit":
        from adamerge.plan import fit

        return fit
    if name == "RunPlan":
        from adamerge.plan import RunPlan

        return RunPlan
    if name == "evaluate":
        from adamerge.train.evaluation import evaluate

        return evaluate
    raise AttributeError(name)
