"""Core tests: TaskVectors, granularity groupings, MergedModel, data-free baselines, input errors.

Every expected value is computed by hand here (θ0 + Σ_t λ[t, g] · m ⊙ τ_t in float64 from the
experts' state dicts), never by calling the code under test a second time.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call

from adamerge import merges
from adamerge.errors import InputError
from adamerge.core.granularity import make_grouping
from adamerge.core.merged import MergedModel, merge_tensor
from adamerge.methods.data_free import build_data_free
from adamerge.core.task_vectors import TaskVectors

RULES = [
    [r"transformer\.resblocks\.0\.", "first"],
    [r"^blocks\.(\d)\.", r"b\1"],  # back-reference: one group per EfficientNet stage
    [".*", "rest"],
]
GRANULARITIES = ["task", "block", "layer", "partition:3", "partition:3:random", RULES]
GRAN_IDS = ["task", "block", "layer", "partition3", "partition3random", "rules"]
BACKBONES = ["vit", "cnn"]
ATOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; on a shared, busy CPU two OpenMP threads that
    spin-wait for each other make a 1 ms forward take 100x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- hand computations
def param_keys(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def hand_label(spec, key: str, backbone: str) -> str:
    """The group label of a parameter, derived from the documented rules without the library."""
    if spec == "task":
        return "all"
    if spec == "layer":
        return key
    if spec == "block":
        m = re.match(r"^(transformer\.resblocks\.\d+)\.", key) or re.match(r"^(blocks\.\d+\.\d+)\.", key)
        return m.group(1) if m else key.split(".")[0]
    # the rules list
    if re.search(r"transformer\.resblocks\.0\.", key):
        return "first"
    m = re.search(r"^blocks\.(\d)\.", key)
    return f"b{m.group(1)}" if m else "rest"


def chunk_sizes(numel: int, r: int) -> list[int]:
    """Documented rule: min(R, numel) contiguous nearly-equal chunks, the first numel % R longer."""
    count = max(1, min(r, numel))
    return [numel // count + (1 if i < numel % count else 0) for i in range(count)]


def element_groups(mm: MergedModel, key: str, numel: int) -> torch.Tensor:
    """Group index of every (flattened) element of parameter ``key``."""
    spec = mm.grouping.spec
    if isinstance(spec, str) and spec.startswith("partition:"):
        r = int(spec.split(":")[1])
        ch = mm.grouping.chunks[key]
        sizes = chunk_sizes(numel, r)
        assert ch.sizes == sizes and ch.count == len(sizes)
        # chunk of each position in chunk order, from my own boundaries
        bounds = torch.tensor([0] + sizes).cumsum(0)
        pos_chunk = torch.empty(numel, dtype=torch.long)
        for i in range(len(sizes)):
            pos_chunk[bounds[i] : bounds[i + 1]] = i
        if spec.endswith(":random") and len(sizes) > 1:
            perm = ch.perm.long()
            assert sorted(perm.tolist()) == list(range(numel))  # a permutation
            elem_chunk = pos_chunk[perm]  # element e sits at chunk-order position perm[e]
        else:
            assert ch.perm is None
            elem_chunk = pos_chunk
        return ch.first + elem_chunk
    return torch.full((numel,), mm.grouping.tensor_group[key], dtype=torch.long)


def hand_merge(mm, base, experts, lam, masks=None) -> dict[str, torch.Tensor]:
    """θ0 + Σ_t λ[t, g(element)] · m_t ⊙ (θ_t − θ0), float64, for every merged parameter."""
    lam = lam.double()
    out = {}
    for key in mm.merge_keys:
        b = base[key].double()
        groups = element_groups(mm, key, b.numel())
        acc = b.flatten().clone()
        for t, name in enumerate(mm.task_names):
            tau = (experts[name][key].double() - b).flatten()
            if masks is not None and key in masks:
                m = masks[key].double()
                m = (m[t] if m.dim() == b.dim() + 1 else m).flatten()
                tau = m * tau
            acc += lam[t, groups] * tau
        out[key] = acc.reshape(b.shape)
    return out


def assert_close(got: dict, want: dict, atol: float = ATOL) -> None:
    for key, w in want.items():
        diff = (got[key].double() - w.double()).abs().max().item()
        assert diff <= atol, f"{key}: max abs diff {diff:.3g} > {atol}"


def build(make_zoo, backbone, num_tasks=2, dtype=torch.float32, **kw):
    model, base, experts = make_zoo(backbone, num_tasks)
    tv = TaskVectors.from_state_dicts(base, experts, dtype=dtype)
    return model, base, experts, tv, MergedModel(model, tv, **kw)


def random_coefficients(mm, low=-0.5, high=1.5, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(mm.coefficients.shape, generator=gen, dtype=mm.coefficients.dtype)


# --------------------------------------------------------------------------- task vectors
@pytest.mark.parametrize("backbone", BACKBONES)
def test_task_vectors_are_expert_minus_base(make_zoo, backbone):
    model, base, experts = make_zoo(backbone, 3)
    tv = TaskVectors.from_state_dicts(base, experts)
    assert tv.num_tasks == 3 and tv.task_names == ["t0", "t1", "t2"]
    float_keys = [k for k, v in base.items() if v.is_floating_point()]
    assert sorted(tv.vectors) == sorted(float_keys)  # integer buffers are not task vectors
    for t, name in enumerate(tv.task_names):
        for k in float_keys:
            want = experts[name][k].double() - base[k].double()
            assert tv.vectors[k].shape == (3, *base[k].shape)
            assert (tv.vectors[k][t].double() - want).abs().max() <= ATOL
        rebuilt = tv.expert_state_dict(name)
        for k, v in experts[name].items():
            assert torch.allclose(rebuilt[k], v, atol=ATOL)


# --------------------------------------------------------------------------- groupings
@pytest.mark.parametrize("spec", GRANULARITIES, ids=GRAN_IDS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_grouping_labels_follow_the_documented_rules(make_zoo, backbone, spec):
    model, base, experts, tv, mm = build(make_zoo, backbone, granularity=spec)
    keys = param_keys(model)
    assert mm.merge_keys == keys  # only parameters are merged; BN buffers follow the policy
    g = mm.grouping
    assert sorted(g.tensor_group) == sorted(keys)
    assert tuple(mm.coefficients.shape) == (2, g.num_groups)
    if isinstance(spec, str) and spec.startswith("partition:"):
        total = sum(len(chunk_sizes(base[k].numel(), 3)) for k in keys)
        assert g.num_groups == total
        for k in keys:
            ch = g.chunks[k]
            assert g.group_names[ch.first : ch.first + ch.count] == [f"{k}#{i}" for i in range(ch.count)]
            assert mm.group_index(k) == ch.first
        sizes = g.group_sizes({k: base[k].shape for k in keys})
        assert sum(sizes) == sum(base[k].numel() for k in keys)
    else:
        labels = {k: hand_label(spec, k, backbone) for k in keys}
        assert sorted(g.group_names) == sorted(set(labels.values()))
        for k in keys:
            assert g.group_names[g.tensor_group[k]] == labels[k]
            assert mm.group_index(k) == g.tensor_group[k]
    if spec == "task":
        assert g.num_groups == 1
    if spec == "layer":
        assert g.num_groups == len(keys) and g.group_names == keys


def test_block_grouping_vit(make_zoo):
    model, base, experts, tv, mm = build(make_zoo, "vit", granularity="block")
    names = set(mm.group_names)
    assert {"transformer.resblocks.0", "transformer.resblocks.1"} <= names
    assert {"conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "proj"} <= names
    assert len(names) == 8
    assert mm.group_names[mm.group_index("transformer.resblocks.1.mlp.c_fc.weight")] == "transformer.resblocks.1"
    assert mm.group_names[mm.group_index("transformer.resblocks.0.attn.in_proj_weight")] == "transformer.resblocks.0"
    assert mm.group_names[mm.group_index("ln_post.bias")] == "ln_post"
    with pytest.raises(InputError, match="not_a_param"):
        mm.group_index("not_a_param")
    # a prefix shared by every name (``visual.``) is dropped before grouping
    shapes = {f"visual.{k}": base[k].shape for k in param_keys(model)}
    g = make_grouping("block", shapes)
    assert set(g.group_names) == names


def test_block_grouping_efficientnet(make_zoo):
    model, base, experts, tv, mm = build(make_zoo, "cnn", granularity="block")
    names = set(mm.group_names)
    assert {"blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.4.0"} <= names
    assert {"conv_stem", "bn1", "conv_head", "bn2"} <= names
    assert len(names) == 9
    assert mm.group_names[mm.group_index("blocks.3.0.se.conv_reduce.weight")] == "blocks.3.0"
    assert mm.group_names[mm.group_index("bn1.weight")] == "bn1"


def test_layer_grouping_has_one_group_per_parameter_tensor(make_zoo):
    for backbone in BACKBONES:
        model, base, experts, tv, mm = build(make_zoo, backbone, granularity="layer")
        keys = param_keys(model)
        assert mm.group_names == keys
        assert [mm.group_index(k) for k in keys] == list(range(len(keys)))


def test_partition_chunks_small_and_odd_tensors():
    shapes = {"a": torch.Size([]), "b": torch.Size([2]), "c": torch.Size([7]), "d": torch.Size([2, 4])}
    g = make_grouping("partition:3", shapes)
    assert [g.chunks[k].sizes for k in shapes] == [[1], [1, 1], [3, 2, 2], [3, 3, 2]]
    assert g.num_groups == 1 + 2 + 3 + 3
    coef = torch.arange(2 * g.num_groups, dtype=torch.float32).reshape(2, -1)
    assert g.chunks["c"].expand(coef)[1].tolist() == [coef[1, 3]] * 3 + [coef[1, 4]] * 2 + [coef[1, 5]] * 2
    r1 = make_grouping("partition:3:random", shapes, seed=1)
    r1b = make_grouping("partition:3:random", shapes, seed=1)
    r2 = make_grouping("partition:3:random", {"x": torch.Size([64])}, seed=2)
    r3 = make_grouping("partition:3:random", {"x": torch.Size([64])}, seed=3)
    assert [r1.chunks[k].sizes for k in shapes] == [[1], [1, 1], [3, 2, 2], [3, 3, 2]]
    assert torch.equal(r1.chunks["d"].perm, r1b.chunks["d"].perm)  # seeded
    assert not torch.equal(r2.chunks["x"].perm, r3.chunks["x"].perm)
    # each random chunk still has its documented size
    lam = r2.chunks["x"].expand(torch.arange(3.0)[None])[0]
    assert [int((lam == i).sum()) for i in range(3)] == [22, 21, 21]
    assert not torch.equal(lam, make_grouping("partition:3", {"x": torch.Size([64])}).chunks["x"].expand(torch.arange(3.0)[None])[0])
    # the dict form of rules equals the list form
    shapes2 = {"transformer.resblocks.0.w": torch.Size([2]), "blocks.3.1.w": torch.Size([2]), "head": torch.Size([1])}
    assert make_grouping({"rules": RULES}, shapes2).group_names == ["first", "b3", "rest"]
    assert make_grouping(RULES, shapes2).tensor_group == make_grouping({"rules": RULES}, shapes2).tensor_group


# --------------------------------------------------------------------------- the merge
@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("spec", GRANULARITIES, ids=GRAN_IDS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_merged_parameters_match_hand_computation(make_zoo, backbone, spec, clamp):
    model, base, experts, tv, mm = build(make_zoo, backbone, num_tasks=3, granularity=spec, clamp=clamp)
    values = random_coefficients(mm, seed=7)
    mm.set_coefficients(values)
    applied = values.clamp(*clamp) if clamp else values
    assert torch.equal(mm.applied_coefficients().detach(), applied)
    got = mm.merged_state_dict()
    assert list(got) == list(model.state_dict())
    assert_close(got, hand_merge(mm, base, experts, applied))
    for k in mm.buffer_keys:  # default policy: θ0's buffers
        assert torch.equal(got[k], base[k])


@pytest.mark.parametrize("chunk", [0, 7, 1 << 15], ids=["one-call", "blocks-of-7", "default"])
def test_merge_tensor_matches_loop(monkeypatch, chunk):
    import adamerge.core.merged

    monkeypatch.setattr(adamerge.core.merged, "CPU_CHUNK", chunk)  # 20 elements: 3 blocks of 7
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(3, 4, 5, generator=gen)
    base = torch.randn(4, 5, generator=gen)
    w = torch.randn(3, generator=gen)
    assert torch.allclose(merge_tensor(w, tau, base), base + sum(w[t] * tau[t] for t in range(3)), atol=ATOL)
    we = torch.randn(3, 4, 5, generator=gen)
    assert torch.allclose(merge_tensor(we, tau, base), base + (we * tau).sum(0), atol=ATOL)
    # bfloat16 storage: computed in the weights' dtype, returned in the base's
    assert merge_tensor(w, tau.bfloat16(), base).dtype == torch.float32
    bf = tau.bfloat16()
    expected = base + sum(w[t] * bf[t].float() for t in range(3))
    assert torch.allclose(merge_tensor(w, bf, base), expected, atol=ATOL)
    # gradients in float64 for both weight shapes
    tau64, base64 = tau.double(), base.double()
    for weights in (w.double().requires_grad_(), we.double().requires_grad_()):
        assert torch.autograd.gradcheck(lambda x: merge_tensor(x, tau64, base64), (weights,))


@pytest.mark.parametrize("chunk", [0, 7], ids=["one-call", "blocks-of-7"])
@pytest.mark.parametrize("scattered", [False, True], ids=["contiguous", "scattered"])
@pytest.mark.parametrize("sizes", [(6, 7, 7), (4, 4, 4, 4, 4)], ids=["3-segments", "5-segments"])
def test_merge_tensor_by_segments_matches_the_hand_merge(monkeypatch, chunk, scattered, sizes):
    """``partition:R``'s path (contiguous segments) and ``partition:R:random``'s and ``:atlas``'s
    (segments scattered by a permutation): one coefficient per task and segment (segments of 6, 7
    and 7 elements across blocks of 7: no boundary aligned; five segments for three tasks: the
    scattered path's blocks of 12 without CPU blocks), against the per-element merge of
    ``Chunks.expand``, with a float64 gradient check."""
    import adamerge.core.merged
    from adamerge.core.granularity import Chunks

    monkeypatch.setattr(adamerge.core.merged, "CPU_CHUNK", chunk)
    gen = torch.Generator().manual_seed(2)
    tau = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    base = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    w = torch.randn(3, len(sizes), dtype=torch.float64, generator=gen, requires_grad=True)
    perm = torch.randperm(20, generator=gen).to(torch.int32) if scattered else None
    per_element = Chunks(0, len(sizes), list(sizes), perm).expand(w.detach()).reshape(3, 4, 5)
    merged = merge_tensor(w, tau, base, sizes, None, perm)
    assert torch.allclose(merged, base + (per_element * tau).sum(0), atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: merge_tensor(x, tau, base, sizes, None, perm), (w,))


def test_merge_into_kept_memory_writes_the_same_values_in_place():
    """``into``: the first call allocates and keeps its output, the next writes into that memory;
    a kept tensor of another dtype or size is replaced, not written."""
    gen = torch.Generator().manual_seed(3)
    tau, base = torch.randn(3, 4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    into = [None]
    first = merge_tensor(torch.ones(3), tau, base, None, into)
    kept = into[0]
    assert kept is not None and first.data_ptr() == kept.data_ptr()
    second = merge_tensor(torch.full((3,), 0.5), tau, base, None, into)
    assert into[0] is kept and second.data_ptr() == kept.data_ptr()
    assert torch.allclose(second, base + 0.5 * tau.sum(0), atol=ATOL)
    assert torch.allclose(first, second)  # the same memory: the first output is overwritten
    other = [torch.empty(7)]
    fresh = merge_tensor(torch.ones(3), tau, base, None, other)
    assert other[0].numel() == 20 and fresh.data_ptr() == other[0].data_ptr()


def test_reused_merged_parameters_are_equal_and_a_saved_overwritten_one_is_refused(make_zoo):
    """``merged_parameters(reuse=True)`` gives the fresh merge's values in the previous call's
    memory (whole-tensor, contiguous- and scattered-partition coefficients); a backward through a
    graph that saved an output overwritten since fails autograd's version check."""
    model, base, experts = make_zoo("vit", 2)
    tv = TaskVectors.from_state_dicts(base, experts)
    for spec in ("layer", "partition:3", "partition:3:random"):
        mm = MergedModel(model, tv, spec, init=0.3)
        first = mm.merged_parameters(reuse=True)
        ptrs = {k: v.data_ptr() for k, v in first.items()}
        with torch.no_grad():
            mm.coefficients.add_(0.1)
        fresh = mm.merged_parameters()
        again = mm.merged_parameters(reuse=True)
        for k in fresh:
            assert again[k].data_ptr() == ptrs[k] and torch.equal(again[k], fresh[k])
        key = next(k for k in first if first[k].dim() == 2)
        saved = (mm.merged_parameters(reuse=True)[key] ** 2).sum()  # pow saves its input
        mm.merged_parameters(reuse=True)
        with pytest.raises(RuntimeError, match="modified inplace"):
            saved.backward()
        held = mm.merged_parameters(reuse=True)[key]
        before = held.clone()
        mm.release_reused()  # the next reuse call allocates anew: what a caller kept stays as it was
        with torch.no_grad():
            mm.coefficients.add_(0.1)
        assert not torch.equal(mm.merged_parameters(reuse=True)[key], before)
        assert torch.equal(held, before)


def test_blocked_merge_of_a_large_tensor_matches_float64():
    gen = torch.Generator().manual_seed(1)
    tau = torch.randn(4, 70_001, generator=gen)  # > 2 default CPU blocks, the last one partial
    base = torch.randn(70_001, generator=gen)
    w = torch.rand(4, generator=gen, requires_grad=True)
    out = merge_tensor(w, tau, base)
    assert torch.allclose(out.double(), base.double() + w.detach().double() @ tau.double(), atol=1e-5)
    g = torch.randn(70_001, generator=gen)
    out.backward(g)
    assert torch.allclose(w.grad.double(), tau.double() @ g.double(), rtol=1e-5, atol=1e-3)


def _gradcheck(mm, x, coefficients, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dim = mm(x).shape[-1]
    proj = torch.randn(dim, 2, generator=gen, dtype=torch.float64)  # few outputs: fast Jacobian

    def f(c):
        return functional_call(mm, {"coefficients": c}, (x,)) @ proj

    c = coefficients.detach().clone().requires_grad_(True)
    # full Jacobian (2 forwards per coefficient); for very many inputs (element masks) the
    # randomized check v^T J u (fast_mode) keeps the cost at a few forwards
    fast = c.numel() > 1000
    assert torch.autograd.gradcheck(f, (c,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast)


def _double_mm(make_zoo, backbone, num_tasks=2, **kw):
    model, base, experts = make_zoo(backbone, num_tasks)
    tv = TaskVectors.from_state_dicts(base, experts, dtype=torch.float64)
    mm = MergedModel(model, tv, **kw).double()
    return mm


@pytest.mark.parametrize("spec", GRANULARITIES, ids=GRAN_IDS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradcheck_coefficients(make_zoo, inputs, backbone, spec):
    mm = _double_mm(make_zoo, backbone, granularity=spec, clamp=None)
    assert mm.coefficients.dtype == torch.float64
    x = inputs(backbone, 1, dtype=torch.float64)
    _gradcheck(mm, x, random_coefficients(mm, seed=3))


def test_gradcheck_with_clamp_inside_box_and_zero_grad_outside(make_zoo, inputs):
    mm = _double_mm(make_zoo, "vit", granularity="block", clamp=(0.0, 1.0))
    x = inputs("vit", 1, dtype=torch.float64)
    _gradcheck(mm, x, random_coefficients(mm, low=0.2, high=0.8))
    values = random_coefficients(mm, low=0.2, high=0.8)
    values[0, 1], values[1, 2] = 1.5, -0.5  # outside the box: the clamp kills the gradient
    mm.set_coefficients(values)
    mm(x).sum().backward()
    grad = mm.coefficients.grad
    assert grad[0, 1] == 0 and grad[1, 2] == 0
    assert (grad.abs() > 0).sum() == grad.numel() - 2


def test_gradcheck_simplex_and_masks(make_zoo, inputs):
    mm = _double_mm(make_zoo, "vit", granularity="partition:3", simplex=True, clamp=None)
    gen = torch.Generator().manual_seed(0)
    key = "transformer.resblocks.1.mlp.c_fc.weight"
    mm.masks = {key: torch.rand(2, 64, 32, generator=gen, dtype=torch.float64)}
    x = inputs("vit", 1, dtype=torch.float64)
    _gradcheck(mm, x, torch.randn(mm.coefficients.shape, generator=gen, dtype=torch.float64))
    # the merge is differentiable in the mask as well
    mask0 = mm.masks[key].clone()
    proj = torch.randn(16, 2, generator=gen, dtype=torch.float64)

    def f(mask):
        mm.masks = {key: mask}
        return mm(x) @ proj

    assert torch.autograd.gradcheck(f, (mask0.requires_grad_(True),), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("spec", ["layer", "partition:3:random", RULES], ids=["layer", "partition3random", "rules"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_to_module_equals_forward_and_is_independent(make_zoo, inputs, backbone, spec):
    policy = "average" if backbone == "cnn" else "base"
    model, base, experts, tv, mm = build(make_zoo, backbone, granularity=spec, buffer_policy=policy)
    mm.set_coefficients(random_coefficients(mm, 0.0, 1.0))
    x = inputs(backbone, 3)
    module = mm.to_module()
    assert not isinstance(module, MergedModel) and not module.training
    assert not any(t.is_meta for t in module.state_dict().values())
    with torch.no_grad():
        want = mm(x)
        got = module(x)
    assert torch.allclose(got, want, atol=ATOL, rtol=0)
    for k, v in mm.merged_state_dict().items():
        assert torch.equal(module.state_dict()[k], v)
    # independent: no shared storage, later coefficient changes do not reach it
    held = {t.data_ptr() for t in mm.buffers()} | {mm.coefficients.data_ptr()}
    assert not held & {t.data_ptr() for t in module.state_dict().values()}
    mm.set_coefficients(random_coefficients(mm, 0.0, 1.0, seed=5))
    with torch.no_grad():
        assert not torch.allclose(mm(x), want, atol=1e-4)
        assert torch.equal(module(x), got)
    # and changing the module does not change the merged model
    with torch.no_grad():
        before = mm(x)
        for p in module.parameters():
            p.add_(1.0)
        assert torch.equal(mm(x), before)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_bfloat16_storage(make_zoo, backbone):
    model, base, experts = make_zoo(backbone, 3)
    tv32 = TaskVectors.from_state_dicts(base, experts)
    tv16 = TaskVectors.from_state_dicts(base, experts, dtype="bfloat16")
    assert tv16.dtype == torch.bfloat16 and tv32.dtype == torch.float32
    assert tv16.nbytes() * 2 == tv32.nbytes()
    lam = torch.rand(3, 1, generator=torch.Generator().manual_seed(0)).expand(3, len(param_keys(model)))
    merged = {}
    for tv in (tv32, tv16):
        mm = MergedModel(model, tv, "layer")
        mm.set_coefficients(lam)
        merged[tv.dtype] = mm.merged_state_dict()
        assert mm.nbytes()["task_vectors"] == tv.nbytes() - sum(
            v.numel() * v.element_size() for k, v in tv.vectors.items() if k not in mm.merge_keys
        )
    for k in param_keys(model):
        a, b = merged[torch.float32][k], merged[torch.bfloat16][k]
        assert b.dtype == torch.float32
        # bfloat16 has 8 significant bits: relative error ≤ 2^-8 per stored τ entry
        bound = sum(lam[t, 0] * (experts[n][k] - base[k]).abs() for t, n in enumerate(tv32.task_names))
        assert ((a - b).abs() <= bound * 2.0**-8 + 1e-6).all(), k
        assert (a - b).abs().max() > 0 or bound.max() == 0  # it really was rounded


@pytest.mark.parametrize("spec", ["layer", "partition:3"], ids=["layer", "partition3"])
def test_masks_shared_and_per_task(make_zoo, inputs, spec):
    model, base, experts, tv, mm = build(make_zoo, "vit", num_tasks=3, granularity=spec, clamp=None)
    lam = random_coefficients(mm)
    mm.set_coefficients(lam)
    gen = torch.Generator().manual_seed(0)
    shared_key, per_task_key = "conv1.weight", "transformer.resblocks.0.attn.in_proj_weight"
    masks = {
        shared_key: torch.rand(base[shared_key].shape, generator=gen),
        per_task_key: (torch.rand(3, *base[per_task_key].shape, generator=gen) > 0.5).float(),
    }
    want = hand_merge(mm, base, experts, lam, masks)
    assert_close(mm.merged_parameters(masks), want)  # explicit argument
    mm.masks = masks  # or stored on the model and used by forward/merged_state_dict/to_module
    assert_close(mm.merged_state_dict(), want)
    x = inputs("vit", 2)
    with torch.no_grad():
        assert torch.allclose(mm.to_module()(x), mm(x), atol=ATOL, rtol=0)
    # unmasked tensors are unaffected; a mask really changes its tensor
    unmasked = hand_merge(mm, base, experts, lam)
    assert torch.equal(want["ln_post.weight"], unmasked["ln_post.weight"])
    assert (want[per_task_key] - unmasked[per_task_key]).abs().max() > 1e-3


@pytest.mark.parametrize("spec", ["task", "block", "partition:3:random"], ids=["task", "block", "partition3random"])
def test_simplex(make_zoo, spec):
    model, base, experts, tv, mm = build(make_zoo, "cnn", num_tasks=3, granularity=spec, clamp=None, simplex=True)
    init = mm.applied_coefficients().detach()
    assert torch.allclose(init, torch.full_like(init, 1 / 3))  # equal init → uniform weights
    raw = random_coefficients(mm, 0.1, 2.0)
    mm.set_coefficients(raw)
    applied = mm.applied_coefficients().detach()
    assert torch.allclose(applied.sum(0), torch.ones(applied.shape[1]), atol=1e-6)
    assert torch.allclose(applied, raw / raw.sum(0, keepdim=True), atol=1e-6)
    assert_close(mm.merged_state_dict(), hand_merge(mm, base, experts, applied))
    with pytest.raises(InputError, match="simplex"):
        MergedModel(model, tv, simplex=True)  # the default clamp must be turned off
    with pytest.raises(InputError, match="positive"):
        MergedModel(model, tv, simplex=True, clamp=None, init=0.0)


# --------------------------------------------------------------------------- buffers
def _bn_buffer_keys(base):
    return [k for k in base if k.endswith(("running_mean", "running_var"))]


def test_buffer_policies(make_zoo, inputs):
    model, base, experts = make_zoo("cnn", 3)
    tv = TaskVectors.from_state_dicts(base, experts)
    bn_keys = _bn_buffer_keys(base)
    assert bn_keys
    out = {}
    for policy in ("base", "average", "reestimate"):
        mm = MergedModel(model, tv, "layer", buffer_policy=policy)
        mm.set_coefficients(random_coefficients(mm, 0.0, 1.0))
        out[policy] = mm.merged_state_dict()
        assert sorted(mm.buffer_keys) == sorted(set(base) - set(param_keys(model)))
    for k in bn_keys:
        assert torch.equal(out["base"][k], base[k])
        assert torch.equal(out["reestimate"][k], base[k])  # until re-estimated
        mean = torch.stack([experts[n][k].double() for n in experts]).mean(0)
        assert (out["average"][k].double() - mean).abs().max() <= ATOL
        assert not torch.allclose(out["average"][k], base[k])
    for k in base:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(out["average"][k], base[k])
    # the parameters do not depend on the buffer policy
    for k in param_keys(model):
        assert torch.equal(out["base"][k], out["average"][k])
    with pytest.raises(InputError, match="buffer_policy"):
        MergedModel(model, tv, buffer_policy="median")


def test_reestimate_buffers_equals_train_mode_bn_with_cumulative_average(make_zoo, inputs):
    model, base, experts = make_zoo("cnn", 2)
    tv = TaskVectors.from_state_dicts(base, experts)
    mm = MergedModel(model, tv, "block", buffer_policy="reestimate")
    mm.set_coefficients(random_coefficients(mm, 0.0, 1.0))
    x1, x2, x = inputs("cnn", 4, seed=1), inputs("cnn", 4, seed=2) * 2 + 0.5, inputs("cnn", 3, seed=3)
    params_before = {k: v for k, v in mm.merged_state_dict().items() if k in mm.merge_keys}

    # reference: the merged module, BN statistics reset, train mode, momentum=None
    ref = mm.to_module()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        ref(x1)
        ref(x2)
    ref.eval()

    assert mm.reestimate_buffers([x1, (x2,)]) == 2
    got = mm.merged_state_dict()
    for k in _bn_buffer_keys(base):
        assert not torch.allclose(got[k], base[k], atol=1e-3), k  # changed
        assert torch.allclose(got[k], ref.state_dict()[k], atol=1e-5, rtol=1e-5), k
    for k in base:
        if k.endswith("num_batches_tracked"):
            assert int(got[k]) == 2
    assert_close(got, params_before, atol=0.0)  # weights untouched
    # the module's BN momenta are restored and the backbone runs in eval mode
    assert all(m.momentum == 0.1 for m in mm._arch.modules() if isinstance(m, nn.BatchNorm2d))
    mm.train()
    with torch.no_grad():
        assert torch.allclose(mm(x), ref(x), atol=1e-5, rtol=0)
    assert torch.equal(mm(x), mm.eval()(x))
    with pytest.raises(InputError, match="empty"):
        mm.reestimate_buffers([])


# --------------------------------------------------------------------------- state and memory
@pytest.mark.parametrize("backbone", BACKBONES)
def test_state_dict_is_coefficients_only_and_memory_bound(make_zoo, backbone):
    model, base, experts_sd = make_zoo(backbone, 3)
    experts = {}
    for name, sd in experts_sd.items():
        experts[name] = copy.deepcopy(model)
        experts[name].load_state_dict(sd)
    tv = TaskVectors.from_modules(model, experts)
    mm = MergedModel(model, tv, "layer", buffer_policy="average")
    sd = mm.state_dict()
    assert list(sd) == ["coefficients"]
    assert sd["coefficients"].numel() * 4 < 4096  # kilobytes
    assert [n for n, _ in mm.named_parameters()] == ["coefficients"]
    # the coefficients round-trip through state_dict
    mm.set_coefficients(random_coefficients(mm, 0.0, 1.0))
    other = MergedModel(model, tv, "layer")
    other.load_state_dict(mm.state_dict())
    assert torch.equal(other.coefficients, mm.coefficients)

    T = 3
    params = dict(model.named_parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in params.values())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    held = mm.nbytes()
    assert held["base"] == model_bytes and held["task_vectors"] == T * model_bytes
    assert held["buffers"] == buffer_bytes
    assert sum(held.values()) <= (T + 1) * model_bytes + buffer_bytes + held["coefficients"]
    # θ0 is not copied: the merged model's base tensors are the model's own storage
    for i, k in enumerate(mm.merge_keys):
        assert getattr(mm, f"_base{i}").data_ptr() == params[k].data_ptr(), k
        assert getattr(mm, f"_tau{i}").data_ptr() == tv.vectors[k].data_ptr(), k
    # the architecture copy holds no storage at all
    assert all(t.is_meta for t in mm._arch.state_dict().values())
    assert not any(t.is_meta for t in model.state_dict().values())


# --------------------------------------------------------------------------- data-free baselines
@pytest.mark.parametrize("backbone", BACKBONES)
def test_data_free_baselines(make_zoo, backbone):
    model, base, experts = make_zoo(backbone, 3)
    tv = TaskVectors.from_state_dicts(base, experts)
    keys = param_keys(model)
    float_keys = [k for k, v in base.items() if v.is_floating_point()]

    wa = build_data_free("weight_average", model, tv, buffer_policy="average")
    assert not wa.coefficients.requires_grad
    got = wa.merged_state_dict()
    for k in float_keys:  # parameters and (with the average policy) BN statistics
        mean = torch.stack([experts[n][k].double() for n in experts]).mean(0)
        assert (got[k].double() - mean).abs().max() <= ATOL, k

    ta = build_data_free("task_arithmetic", model, tv, lam=0.4)
    got = ta.merged_state_dict()
    for k in keys:
        want = base[k].double() + 0.4 * sum(experts[n][k].double() - base[k].double() for n in experts)
        assert (got[k].double() - want).abs().max() <= ATOL, k

    ti = build_data_free("ties", model, tv, lam=0.3, density=0.2)
    got = ti.merged_state_dict()
    params = {k: tv.vectors[k] for k in keys}  # TIES runs on the parameters only
    want = merges.merged_state(base, merges.ties(params, lam=0.3, density=0.2))
    assert_close({k: got[k] for k in keys}, {k: want[k] for k in keys})
    assert not torch.allclose(got[keys[0]], ta.merged_state_dict()[keys[0]])

    with pytest.raises(InputError, match="fisher"):
        build_data_free("fisher", model, tv)


def test_ties_by_hand_on_a_toy_stack():
    stacks = {"w": torch.tensor([[3.0, -1.0, 0.5, 2.0], [-4.0, 2.0, 0.1, 1.0]])}
    # density 0.5 keeps each task's top-2 magnitudes: t0 {3, 2}, t1 {-4, 2}
    # elected signs from the trimmed sum: [-1, +1, +1, +1]; agreeing entries: t0 2.0 (idx 3),
    # t1 -4 (idx 0), t1 2 (idx 1) → disjoint mean [-4, 2, 0, 2]
    got = merges.ties(stacks, lam=1.0, density=0.5)["w"]
    assert torch.allclose(got, torch.tensor([-4.0, 2.0, 0.0, 2.0]))


def test_ties_threshold_uses_parameters_only(make_zoo):
    model, base, experts = make_zoo("cnn", 3)
    tv = TaskVectors.from_state_dicts(base, experts)
    keys = param_keys(model)
    got = build_data_free("ties", model, tv, density=0.2).merged_state_dict()
    params_only = merges.ties({k: tv.vectors[k] for k in keys}, lam=0.3, density=0.2)
    want = merges.merged_state({k: base[k] for k in keys}, params_only)
    assert_close({k: got[k] for k in keys}, want)


def test_ties_with_average_policy_keeps_the_experts_mean_buffers(make_zoo):
    model, base, experts = make_zoo("cnn", 3)
    tv = TaskVectors.from_state_dicts(base, experts)
    got = build_data_free("ties", model, tv, buffer_policy="average").merged_state_dict()
    for k in _bn_buffer_keys(base):
        mean = torch.stack([experts[n][k].double() for n in experts]).mean(0)
        assert (got[k].double() - mean).abs().max() <= ATOL, k


# --------------------------------------------------------------------------- input errors
def _cloned(sd):
    return {k: v.clone() for k, v in sd.items()}


def test_error_missing_and_extra_keys(make_zoo):
    model, base, experts = make_zoo("vit", 2)
    bad = dict(experts["t1"])
    del bad["ln_post.bias"]
    with pytest.raises(InputError, match=r"expert 't1'.*missing key 'ln_post\.bias'"):
        TaskVectors.from_state_dicts(base, {"t0": experts["t0"], "t1": bad})
    bad = {**experts["t1"], "head.extra": torch.zeros(3)}
    with pytest.raises(InputError, match=r"expert 't1'.*unexpected key 'head\.extra'"):
        TaskVectors.from_state_dicts(base, {"t0": experts["t0"], "t1": bad})
    # ``keys`` restricts the state: an absent requested key is named
    with pytest.raises(InputError, match="nope"):
        TaskVectors.from_state_dicts(base, experts, keys=["conv1.weight", "nope"])


def test_error_shape_and_dtype_mismatch(make_zoo):
    model, base, experts = make_zoo("vit", 2)
    bad = {**experts["t0"], "proj": torch.zeros(16, 32)}
    with pytest.raises(InputError, match=r"expert 't0'.*'proj'.*\(16, 32\)"):
        TaskVectors.from_state_dicts(base, {"t0": bad, "t1": experts["t1"]})
    bad = {**experts["t1"], "ln_pre.weight": experts["t1"]["ln_pre.weight"].double()}
    with pytest.raises(InputError, match=r"expert 't1'.*'ln_pre\.weight'.*float64"):
        TaskVectors.from_state_dicts(base, {"t0": experts["t0"], "t1": bad})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_error_non_finite(make_zoo, value):
    model, base, experts = make_zoo("vit", 2)
    bad = _cloned(experts["t1"])
    bad["transformer.resblocks.1.ln_2.bias"][3] = value
    with pytest.raises(InputError, match=r"expert 't1'.*transformer\.resblocks\.1\.ln_2\.bias.*non-finite"):
        TaskVectors.from_state_dicts(base, {"t0": experts["t0"], "t1": bad})
    bad_base = _cloned(base)
    bad_base["class_embedding"][0] = value
    with pytest.raises(InputError, match=r"base.*class_embedding.*non-finite"):
        TaskVectors.from_state_dicts(bad_base, experts)


def test_error_too_few_experts_and_bad_dtype(make_zoo):
    model, base, experts = make_zoo("vit", 2)
    with pytest.raises(InputError, match="at least 2 experts.*got 1"):
        TaskVectors.from_state_dicts(base, {"t0": experts["t0"]})
    with pytest.raises(InputError, match="got 0"):
        TaskVectors.from_state_dicts(base, {})
    with pytest.raises(InputError, match="float16"):
        TaskVectors.from_state_dicts(base, experts, dtype="float16")


def test_error_granularity(make_zoo):
    model, base, experts = make_zoo("vit", 2)
    tv = TaskVectors.from_state_dicts(base, experts)
    with pytest.raises(InputError, match="'blocks'"):
        MergedModel(model, tv, "blocks")
    for spec in ("partition:0", "partition:x", "partition:3:shuffled", "partition:3:random:1"):
        with pytest.raises(InputError, match=re.escape(spec)):
            MergedModel(model, tv, spec)
    with pytest.raises(InputError, match="class_embedding.*matches no granularity rule"):
        MergedModel(model, tv, [[r"^transformer\.", "body"]])
    with pytest.raises(InputError, match="rule #0"):
        MergedModel(model, tv, [["only-a-regex"]])
    with pytest.raises(InputError, match=r"rule #1.*bad regex"):
        MergedModel(model, tv, [["a", "x"], ["(", "y"]])
    with pytest.raises(InputError, match="init"):
        MergedModel(model, tv, "layer", init=torch.zeros(5, 7))


def test_error_from_files(make_zoo, tmp_path):
    from safetensors.torch import save_file

    model, base, experts = make_zoo("vit", 2)
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    save_file({k: v.contiguous() for k, v in experts["t0"].items()}, str(tmp_path / "t0.safetensors"))
    missing = tmp_path / "t1.safetensors"
    with pytest.raises(InputError, match=re.escape(str(missing))):
        TaskVectors.from_files(tmp_path / "base.safetensors", {"t0": tmp_path / "t0.safetensors", "t1": missing})
    with pytest.raises(InputError, match="nobase.safetensors"):
        TaskVectors.from_files(tmp_path / "nobase.safetensors", {"t0": tmp_path / "t0.safetensors", "t1": missing})
    # with the file present, from_files equals from_state_dicts
    save_file({k: v.contiguous() for k, v in experts["t1"].items()}, str(missing))
    tv = TaskVectors.from_files(tmp_path / "base.safetensors", {"t0": tmp_path / "t0.safetensors", "t1": missing})
    ref = TaskVectors.from_state_dicts(base, experts)
    assert all(torch.equal(tv.vectors[k], ref.vectors[k]) for k in ref.vectors)
    assert tv.sources["t1"] == str(missing)


def test_error_model_keys_do_not_match_task_vectors(make_zoo):
    vit, vbase, vexperts = make_zoo("vit", 2)
    cnn, cbase, cexperts = make_zoo("cnn", 2)
    tv_vit = TaskVectors.from_state_dicts(vbase, vexperts)
    with pytest.raises(InputError, match="conv_stem.weight"):
        MergedModel(cnn, tv_vit)
    # task vectors restricted to a subset of the keys: the model's extra key is named
    keys = [k for k in vbase if k != "ln_post.bias"]
    tv_sub = TaskVectors.from_state_dicts(vbase, vexperts, keys=keys)
    with pytest.raises(InputError, match=r"ln_post\.bias"):
        MergedModel(vit, tv_sub)
    # same keys, different shape
    bad_base = {**vbase, "proj": torch.zeros(32, 8)}
    bad_experts = {n: {**sd, "proj": torch.zeros(32, 8)} for n, sd in vexperts.items()}
    with pytest.raises(InputError, match=r"proj.*\(32, 16\).*\(32, 8\)"):
        MergedModel(vit, TaskVectors.from_state_dicts(bad_base, bad_experts))


def test_images_go_channels_last_for_convolutional_networks_only():
    """A CNN (two or more Conv2d, e.g. EfficientNet) gets channels-last images; a ViT (one patch
    convolution) keeps the contiguous layout, also through a MergedModel's architecture."""
    from adamerge.train.data import images_layout, prefers_channels_last
    from adamerge.zoo.tiny import tiny_vit

    x = torch.randn(2, 3, 8, 8)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    vit = tiny_vit(0)
    assert prefers_channels_last(cnn) and not prefers_channels_last(vit)
    assert images_layout(x, cnn).is_contiguous(memory_format=torch.channels_last)
    assert not images_layout(x, cnn).is_contiguous()
    assert images_layout(x, vit) is x
    base = {k: v.detach().clone() for k, v in cnn.state_dict().items()}
    tv = TaskVectors.from_state_dicts(base, {t: {k: v + 0.1 for k, v in base.items()} for t in ("a", "b")})
    assert prefers_channels_last(MergedModel(cnn, tv, "layer"))
    assert images_layout(torch.randn(2, 5), cnn).dim() == 2  # not images: unchanged
