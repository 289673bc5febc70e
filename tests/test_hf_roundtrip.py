"""Hugging Face models in and out (issue 26): tiny models of each family built with transformers
itself and saved as a user's folders would be, layer-wise coefficients fitted through adamerge,
the run exported, and the export reloaded with ``from_pretrained``: its outputs equal the
functional merged model's. And the merge equals the same merge computed here by hand on the
raw tensors of the folders."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import hf_zoo
from adamerge import RunPlan
from adamerge.workflows.export import export_run, load_run

tf = hf_zoo.transformers


def _fit_and_export(root: Path, zoo: dict, **options) -> tuple[Path, Path]:
    config = hf_zoo.write_config(root / "cfg", zoo, **options)
    RunPlan.from_config(config, progress=False).fit()
    run, out = root / "cfg" / "run", root / "export"
    export_run(run, out)
    return run, out


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    zoo = hf_zoo.clip_zoo(root)
    return (zoo, *_fit_and_export(root, zoo))


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    zoo = hf_zoo.gpt2_cls_zoo(root)
    return (zoo, *_fit_and_export(root, zoo))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """float64 weights, tied embeddings: the hand computation below can be compared to 1e-12."""
    root = tmp_path_factory.mktemp("llama")
    zoo = hf_zoo.llama_zoo(root, dtype=torch.float64)
    return (zoo, *_fit_and_export(root, zoo))


def _stream_inputs(run: Path, task: str) -> torch.Tensor:
    merged, parts, _ = load_run(run)
    stream = next(s for s in parts["streams"] if s.name == task)
    return stream.inputs(torch.arange(len(stream)))


def _moved(run: Path) -> torch.Tensor:
    """The fitted applied coefficients [T, G] (they moved away from the init 0.3: a real fit)."""
    merged, _, _ = load_run(run)
    coef = merged.applied_coefficients().detach()
    assert (coef - 0.3).abs().max() > 1e-3
    return coef


def test_clip_vision_export_reloads_with_from_pretrained_and_gives_the_merged_outputs(clip_run):
    zoo, run, out = clip_run
    _moved(run)
    merged, parts, _ = load_run(run)
    reloaded = tf.CLIPVisionModelWithProjection.from_pretrained(str(out)).eval()
    heads = load_file(str(out / "heads.safetensors"))
    for task in hf_zoo.TASKS:
        x = _stream_inputs(run, task)
        with torch.no_grad():
            want = merged(x)
            got = reloaded(pixel_values=x).image_embeds
            assert_close(got, want, rtol=1e-5, atol=1e-5)
            # the zero-shot head beside it gives the same logits as the run's head
            logits = torch.nn.functional.normalize(got, dim=-1) @ heads[f"{task}.weight"].T
            assert_close(logits, parts["heads"][task](want), rtol=1e-4, atol=1e-4)
    meta = json.loads((out / "adamerge.json").read_text())
    assert meta["format"] == "hf" and meta["architecture"] == "CLIPVisionModelWithProjection"
    assert set(meta["inputs"]["experts"]) == set(hf_zoo.TASKS)
    assert "from_pretrained" in (out / "README.md").read_text()
    # a previous Hugging Face export is recognised as one: --force replaces it
    export_run(run, out, force=True)
    assert (out / "config.json").is_file()


def test_clip_zero_shot_heads_are_built_from_the_text_tower_as_fusionbench_does(clip_run):
    zoo, run, out = clip_run
    base = tf.CLIPModel.from_pretrained(zoo["base"]).eval()
    tok = tf.AutoTokenizer.from_pretrained(zoo["base"])
    heads = load_file(str(out / "heads.safetensors"))
    spec = zoo["heads"]["t1"]
    rows = []
    with torch.no_grad():
        for name in spec["classnames"]:
            enc = tok([t.format(name) for t in spec["templates"]], padding=True, return_tensors="pt")
            out_ = base.get_text_features(**enc)
            emb = out_ if isinstance(out_, torch.Tensor) else out_.pooler_output
            emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
            rows.append(torch.nn.functional.normalize(emb, dim=-1) * base.logit_scale.exp())
    assert_close(heads["t1.weight"], torch.stack(rows), rtol=1e-5, atol=1e-5)


def test_gpt2_sequence_classifier_export_reloads_and_keeps_each_experts_classifier(gpt2_run):
    zoo, run, out = gpt2_run
    _moved(run)
    merged, parts, _ = load_run(run)
    backbone = tf.AutoModel.from_pretrained(str(out)).eval()
    assert type(backbone).__name__ == "GPT2Model"
    heads = load_file(str(out / "heads.safetensors"))
    for i, task in enumerate(hf_zoo.TASKS):
        expert = load_file(str(Path(zoo["experts"][task]) / "model.safetensors"))
        assert torch.equal(heads[f"{task}.weight"], expert["score.weight"])  # the expert's own layer, kept
        assert heads[f"{task}.weight"].shape[0] == 2 + i
        x = _stream_inputs(run, task)
        mask = (x != 0).long()  # pad id 0
        with torch.no_grad():
            hidden = backbone(input_ids=x, attention_mask=mask).last_hidden_state
            last = (mask * torch.arange(x.shape[1])).argmax(-1)
            got = hidden[torch.arange(x.shape[0]), last] @ heads[f"{task}.weight"].T
            want = parts["heads"][task](merged(x))
        assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the reloaded backbone + head is transformers' own classifier for that task
        clf = tf.GPT2ForSequenceClassification(tf.GPT2Config.from_pretrained(zoo["experts"][task])).eval()
        clf.transformer.load_state_dict(backbone.state_dict())
        clf.score.weight.data.copy_(heads[f"{task}.weight"])
        with torch.no_grad():
            assert_close(clf(input_ids=x, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)


def test_llama_causal_lm_export_reloads_with_tied_embeddings_and_gives_the_merged_logits(llama_run):
    zoo, run, out = llama_run
    _moved(run)
    merged, _, _ = load_run(run)
    lm = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64).eval()
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still tied after the merge
    assert not (out / "heads.safetensors").exists()
    assert tf.AutoTokenizer.from_pretrained(str(out)).eos_token == "</s>"  # the tokenizer came along
    for task in hf_zoo.TASKS:
        x = _stream_inputs(run, task)
        with torch.no_grad():
            assert_close(lm(input_ids=x).logits, merged(x), rtol=1e-10, atol=1e-10)
    # non-persistent buffers (rotary frequencies) are the merged model's
    arch = merged.to_module().hf
    for name, buf in lm.named_buffers():
        assert_close(buf.double(), dict(arch.named_buffers())[name].double())


def _hand_merge(zoo: dict, run: Path) -> dict[str, torch.Tensor]:
    """θ0 + Σ_t λ[t, g(k)] (θ_t − θ0) on the raw tensors of the folders, in float64, with the
    layer-wise group of each tensor being the tensor itself (groups.json names them)."""
    groups = [g["name"] for g in json.loads((run / "groups.json").read_text())["groups"]]
    coef = load_file(str(run / "coefficients.safetensors"))
    lam = next(iter(coef.values())).double().clamp(0, 1)
    base = load_file(str(Path(zoo["base"]) / "model.safetensors"))
    experts = [load_file(str(Path(zoo["experts"][t]) / "model.safetensors")) for t in hf_zoo.TASKS]
    return {k: v + sum(lam[t, groups.index(k)] * (e[k] - v) for t, e in enumerate(experts)) for k, v in base.items()}


def test_the_merge_equals_the_hand_computation_on_the_raw_tensors(llama_run):
    zoo, run, out = llama_run
    hand = _hand_merge(zoo, run)
    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) == set(hand)  # every tensor, the tied embedding once (as save_pretrained writes it)
    for key, value in hand.items():
        assert exported[key].dtype == torch.float64
        assert_close(exported[key], value, rtol=0, atol=1e-12, msg=key)
    # and the functional model in memory: every tensor, the tied output layer and the buffers
    merged, _, _ = load_run(run)
    state = merged.merged_state_dict()
    assert_close(state["lm_head.weight"], hand["model.embed_tokens.weight"], rtol=0, atol=1e-12)
    for key, value in hand.items():
        assert_close(state[key], value, rtol=0, atol=1e-12, msg=key)
    lm = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64)
    for name, p in lm.named_parameters(remove_duplicate=False):
        want = hand["model.embed_tokens.weight"] if name == "lm_head.weight" else hand[name]
        assert_close(p.detach(), want, rtol=0, atol=1e-12, msg=name)


def test_an_untied_gpt2_classifier_backbone_equals_the_hand_merge_too(gpt2_run):
    zoo, run, out = gpt2_run
    groups = [g["name"] for g in json.loads((run / "groups.json").read_text())["groups"]]
    lam = next(iter(load_file(str(run / "coefficients.safetensors")).values())).double().clamp(0, 1)
    base = load_file(str(Path(zoo["base"]) / "model.safetensors"))
    experts = [load_file(str(Path(zoo["experts"][t]) / "model.safetensors")) for t in hf_zoo.TASKS]
    exported = load_file(str(out / "model.safetensors"))
    keys = [k for k in base if k.startswith("transformer.")]
    assert {f"transformer.{k}" for k in exported} == set(keys)  # GPT2Model's names, nothing else
    for key in keys:
        hand = base[key].double() + sum(lam[t, groups.index(key)] * (e[key].double() - base[key].double())
                                        for t, e in enumerate(experts))
        assert_close(exported[key[len("transformer."):]].double(), hand, rtol=0, atol=1e-6, msg=key)


def test_the_expert_guided_objective_compares_next_token_distributions_per_position(tmp_path):
    """``expert_distill`` on a causal LM: each expert's next-token logits on its own windows are
    cached as [N, L, V] (they are the expert's own logits), and the fit trains on them."""
    zoo = hf_zoo.llama_zoo(tmp_path / "zoo")
    config = hf_zoo.write_config(tmp_path / "cfg", zoo, objective="expert_distill", steps=1)
    RunPlan.from_config(config, progress=False).fit()
    run = tmp_path / "cfg" / "run"
    merged, parts, _ = load_run(run)
    with open(run / "metrics.csv") as f:
        first = next(csv.DictReader(f))
    stream = next(s for s in parts["streams"] if s.name == "t0")
    cached = next((run / "cache").glob("expert_logits-t0-*.safetensors"))
    targets = next(iter(load_file(str(cached)).values()))
    assert tuple(targets.shape) == (len(stream), 8, hf_zoo.VOCAB)
    expert = tf.AutoModelForCausalLM.from_pretrained(zoo["experts"]["t0"]).eval()
    x = stream.inputs(torch.arange(len(stream)))
    with torch.no_grad():
        assert_close(targets, expert(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    assert float(first["loss/t0"]) > 0
