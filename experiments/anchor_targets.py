"""How good is each ``trusted_distill`` target before any fit, and can a label-free statistic tell
whose guess to trust where the expert is unsure (issue 24, session 37)?

For each task of each demo setting it computes the expert's and the starting merge's (task
arithmetic λ = 0.3) predictions on the test stream, on the image itself and on the nine shifted
views of ``adamerge.train.expert_targets.shifted_views``, then prints

- the share of samples each target rule gets right (its argmax against the label): ``mean`` (the
  session-36 target), ``start_views=K`` (the start averaged over K views; the expert single-view),
  ``both_views`` (both averaged over nine views, the trust threshold on the averaged expert),
  ``aligned`` (the start's distribution reweighted to the expert's class balance);
- per task, the label-free statistics on the unsure samples (expert max probability < 0.9) that a
  per-task trust could use: mean confidence, agreement, the class balance of the predictions
  (entropy of the predicted-class histogram over log C), stability under the views (share of
  views predicting the unshifted image's class) and that stability beyond chance (kappa), beside
  who is actually right there.

Labels only score. The zoos are the demo's (built and cached as ``adamerge demo`` does)::

    python experiments/anchor_targets.py --settings quick,full0,full1,sub2
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trusted_recommendation import SETTINGS  # noqa: E402

from adamerge.core.task_vectors import TaskVectors  # noqa: E402
from adamerge.methods.data_free import build_data_free  # noqa: E402
from adamerge.train.data import stream_from_tensors  # noqa: E402
from adamerge.train.expert_targets import compute_expert_logits, shifted_views, stream_logits  # noqa: E402
from adamerge.workflows import demo  # noqa: E402
from adamerge.zoo import build_zoo, create_backbone  # noqa: E402

VIEWS = 9


def _zoo(name: str, cache: Path):
    st = SETTINGS[name]
    setting = demo.QUICK if st.get("quick") else demo.FULL
    tasks = st.get("tasks") or list(demo.DEFAULT_TASKS)[: 3 if st.get("quick") else None]
    zoo = build_zoo(cache, tasks, image_size=st.get("image_size") or setting.image_size, seed=st.get("seed", 0),
                    steps=setting.zoo_steps, n_train=setting.n_train, n_test=setting.n_test, progress=False)
    return tasks, zoo


def _views_logits(fn, x: torch.Tensor) -> torch.Tensor:
    """``[N, V, C]``: ``fn(images)`` on each of the nine views."""
    return torch.stack([fn(v.contiguous()) for v in shifted_views(x, VIEWS)], dim=1)


def _balance(pred: torch.Tensor, c: int) -> float:
    h = torch.bincount(pred, minlength=c).float()
    m = h / h.sum()
    return float(-(m * m.clamp_min(1e-12).log()).sum() / math.log(c))


def _stability(probs: torch.Tensor, keep: torch.Tensor) -> tuple[float, float]:
    """Share of the shifted views predicting the unshifted view's class, and the same beyond the
    agreement the predictor's class balance gives by chance (kappa)."""
    a = probs.argmax(-1)[keep]
    st = (a[:, 1:] == a[:, :1]).float().mean()
    h = torch.bincount(a.reshape(-1), minlength=probs.shape[-1]).float()
    chance = ((h / h.sum()) ** 2).sum()
    return float(st), float((st - chance) / (1 - chance).clamp_min(1e-6))


def task_report(pe_v: torch.Tensor, ps_v: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict]:
    """The target rules' accuracy (%) and the unsure samples' statistics, from ``[N, V, C]`` probabilities."""
    pe, ps = pe_v[:, 0], ps_v[:, 0]
    sure = pe.amax(-1, keepdim=True) >= 0.9
    pe_m, ps_m = pe_v.mean(1), ps_v.mean(1)
    aligned = ps * (pe.mean(0) / ps.mean(0).clamp_min(1e-8))
    aligned = aligned / aligned.sum(-1, keepdim=True)
    rules = {"mean": torch.where(sure, pe, (pe + ps) / 2)}
    for k in (5, VIEWS):
        rules[f"start_views={k}"] = torch.where(sure, pe, (pe + ps_v[:, :k].mean(1)) / 2)
    rules["both_views"] = torch.where(pe_m.amax(-1, keepdim=True) >= 0.9, pe_m, (pe_m + ps_m) / 2)
    rules["aligned"] = torch.where(sure, pe, (pe + aligned) / 2)
    acc = {k: 100 * float((v.argmax(-1) == y).float().mean()) for k, v in rules.items()}
    u = ~sure[:, 0]
    stats = {"unsure": float(u.float().mean())}
    if int(u.sum()) >= 5:
        ye, ys, c = pe.argmax(-1), ps.argmax(-1), pe.shape[-1]
        stats.update({
            "right_E": 100 * float((ye[u] == y[u]).float().mean()), "right_S": 100 * float((ys[u] == y[u]).float().mean()),
            "conf_E": float(pe[u].amax(-1).mean()), "conf_S": float(ps[u].amax(-1).mean()),
            "agree": float((ye[u] == ys[u]).float().mean()),
            "balance_E": _balance(ye[u], c), "balance_S": _balance(ys[u], c),
        })
        stats["stable_E"], stats["kappa_E"] = _stability(pe_v, u)
        stats["stable_S"], stats["kappa_S"] = _stability(ps_v, u)
    return acc, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="quick,full0,full1,sub2")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "adamerge")
    args = p.parse_args()
    means: dict[str, dict[str, list[float]]] = {}
    for name in args.settings.split(","):
        tasks, zoo = _zoo(name, args.cache_dir)
        heads = {t: demo.LinearHead.from_state_dict(zoo.heads[t], source="zoo") for t in tasks}
        tv = TaskVectors.from_state_dicts(zoo.base, {t: zoo.experts[t] for t in tasks})
        start = build_data_free("task_arithmetic", create_backbone(pretrained=False), tv, lam=0.3).eval()
        for t in tasks:
            x, y, classes = torch.as_tensor(zoo.tasks[t].x_test).float(), zoo.tasks[t].y_test, zoo.tasks[t].classes

            def expert(v, t=t):
                return compute_expert_logits(create_backbone(pretrained=False), tv, t, heads[t], stream_from_tensors(t, v, None, classes))

            def anchor(v, t=t):
                return stream_logits(start, heads[t], stream_from_tensors(t, v, None, classes))

            acc, stats = task_report(_views_logits(expert, x).softmax(-1), _views_logits(anchor, x).softmax(-1), y)
            for k, v in acc.items():
                means.setdefault(name, {}).setdefault(k, []).append(v)
            print(f"{name:6s} {t:14s} " + " ".join(f"{k} {v:5.1f}" for k, v in acc.items()), flush=True)
            if "right_E" in stats:
                print(f"{'':21s}unsure {stats['unsure']:.2f}: right E {stats['right_E']:.1f} S {stats['right_S']:.1f} | "
                      f"conf E {stats['conf_E']:.2f} S {stats['conf_S']:.2f} | agree {stats['agree']:.2f} | "
                      f"balance E {stats['balance_E']:.2f} S {stats['balance_S']:.2f} | stable E {stats['stable_E']:.2f} "
                      f"S {stats['stable_S']:.2f} | kappa E {stats['kappa_E']:.2f} S {stats['kappa_S']:.2f}", flush=True)
    print()
    for name, rules in means.items():
        print(f"{name:6s} mean over tasks: " + " ".join(f"{k} {sum(v) / len(v):5.2f}" for k, v in rules.items()))


if __name__ == "__main__":
    main()
