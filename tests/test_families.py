"""Every supported model family on a tiny random model built from its config class: the patched model equals the
stock one (logits, greedy generation, gradients), the recorder's counts equal a recount of the stock routers'
choices, a masked expert is never chosen, a short masked training step changes only the selected expert slices
(or is refused, naming the family, where the expert layout is not one expert slices train), and the pipeline
(analyze, train, evaluate) runs end to end on each family."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers

import moe_fastmask as mf
from moe_fastmask.integrations import expert_slices

# padding rows of a Triton tile compute (-inf) - (-inf) and 1 / 0 in the interpreter; their results are never stored
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

# (config class, model class, config arguments): 2 MoE layers, few experts; DeepSeek-style models also get one
# dense layer first (first_k_dense_replace), Qwen2-MoE its shared expert
FAMILIES = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, intermediate_size=32, moe_intermediate_size=16,
        norm_topk_prob=True, head_dim=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_hidden_layers=2, num_local_experts=6, num_experts_per_tok=2, intermediate_size=16)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, head_dim=8,
        sliding_window=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, intermediate_size=32, moe_intermediate_size=16, n_shared_experts=1, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, intermediate_size=32, moe_intermediate_size=16, n_shared_experts=1, head_dim=8,
        routed_scaling_factor=2.5)),
}
NAMES = list(FAMILIES)
IDS = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(11))
GROUPS = [0, 1, 0]


def tiny_model(name: str, seed: int = 0):
    config_name, model_name, kwargs = FAMILIES[name]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls(config_cls(**COMMON, **kwargs)).eval()
    model.config._experts_implementation = "eager"
    adapter = mf.get_adapter(model)
    with torch.no_grad():  # decisive routing (random tiny routers are near-uniform) and a real selection bias
        for router in adapter.routers(adapter.base_model(model)):
            # sigmoid routers: logits of a few units, so scores do not saturate to 1.0 (ties broken by rounding)
            router.weight.normal_(0.0, 0.35 if hasattr(router, "e_score_correction_bias") else 1.0)
            if getattr(router, "bias", None) is not None:
                router.bias.normal_(0.0, 0.5)
            if getattr(router, "e_score_correction_bias", None) is not None:
                router.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def routers(model):
    adapter = mf.get_adapter(model)
    return adapter.routers(adapter.base_model(model))


def capture_router_ids(model, inputs) -> list[torch.Tensor]:
    """[L] tensors [T, K]: the expert ids each MoE router returns in one forward of ``inputs``."""
    captured = []
    handles = [r.register_forward_hook(lambda m, a, out: captured.append(out[2].detach().clone())) for r in routers(model)]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def recount(ids_per_layer, groups, num_groups, seq_len, num_experts) -> torch.Tensor:
    """[L, G, E] counts (the recorder's layout) from per-layer ids [B * S, K] and per-sequence groups."""
    counts = torch.zeros(len(ids_per_layer), num_groups, num_experts, dtype=torch.int64)
    token_group = torch.tensor(groups).repeat_interleave(seq_len)
    for layer, ids in enumerate(ids_per_layer):
        for g in range(num_groups):
            counts[layer, g] += torch.bincount(ids[token_group == g].flatten(), minlength=num_experts)
    return counts


@pytest.mark.parametrize("name", NAMES)
def test_adapter_is_registered_and_describes_the_router(name):
    model = tiny_model(name)
    adapter = mf.get_adapter(model)
    assert adapter.model_type == name == model.config.model_type
    blocks = adapter.moe_blocks(adapter.base_model(model))
    assert len(blocks) == 2  # dense layers of DeepSeek-style models are skipped
    semantics = adapter.router_semantics(adapter.router(blocks[0]))
    assert semantics.unsupported_by_route() == []
    assert semantics.shared_experts == (name in ("qwen2_moe", "deepseek_v3", "glm4_moe"))


@pytest.mark.parametrize("name", NAMES)
def test_patched_equals_stock(name):
    """No mask: the same logits, the same greedy generation and the same gradients as the stock model."""
    stock = tiny_model(name)
    ours = copy.deepcopy(stock)
    mf.apply(ours)
    assert all("forward" in r.__dict__ for r in routers(ours))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, stock(IDS).logits, atol=1e-5, rtol=1e-5)
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(IDS, **gen), stock.generate(IDS, **gen))
    for model in (stock, ours):
        model(IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    checked = 0
    for n, p in stock.named_parameters():
        if p.grad is None:
            assert grads[n] is None or not grads[n].any(), n
            continue
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
        checked += 1
    assert checked > 0
    router_grads = [r.weight.grad for r in routers(ours)]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads)  # gradients reach the routers
    mf.remove(ours)
    assert all("forward" not in r.__dict__ for r in routers(ours))


@pytest.mark.parametrize("name", NAMES)
def test_recorder_counts_equal_stock_router_choices(name):
    stock = tiny_model(name)
    stock_ids = capture_router_ids(stock, IDS)
    model = mf.apply(copy.deepcopy(stock))
    rec = mf.RoutingRecorder(model, num_groups=2, record_token_experts=True)
    with torch.no_grad(), rec.record(GROUPS):
        model(IDS)
    num_experts = mf.get_adapter(model).num_experts(routers(model)[0])
    expected = recount(stock_ids, GROUPS, 2, IDS.shape[1], num_experts)
    assert torch.equal(rec.prefill_counts.cpu(), expected)
    assert int(expected.sum()) == IDS.numel() * stock_ids[0].shape[1] * len(stock_ids)


@pytest.mark.parametrize("name", NAMES)
def test_masked_expert_is_never_chosen(name):
    model = tiny_model(name)
    stock_ids = capture_router_ids(model, IDS)
    # the expert each layer chose most often: masking it must change routing
    hot = [int(torch.bincount(ids.flatten()).argmax()) for ids in stock_ids]
    mf.apply(model)
    keep = mf.steering_mask(model, [(layer, e) for layer, e in enumerate(hot)])
    mf.set_expert_mask(model, keep)
    rec = mf.RoutingRecorder(model, num_groups=2, record_token_experts=True)
    with torch.no_grad(), rec.record(GROUPS):
        model(IDS)
    chosen = rec.token_experts()["prefill"]  # [B, S, L, K]
    for layer, e in enumerate(hot):
        assert not (chosen[:, :, layer] == e).any()
        assert int(rec.prefill_counts[layer, :, e].sum()) == 0
    masked_ids = capture_router_ids(model, IDS)
    assert all(not (ids == e).any() for ids, e in zip(masked_ids, hot))
    assert int(rec.prefill_counts.sum()) == IDS.numel() * stock_ids[0].shape[1] * len(stock_ids)


def _fused_expert_tensors(model):
    adapter = mf.get_adapter(model)
    layout = adapter.expert_layout
    return [(getattr(m, layout.gate_up), getattr(m, layout.down)) for m in adapter.experts_modules(adapter.base_model(model))]


@pytest.mark.parametrize("name", NAMES)
def test_masked_training_step_changes_only_selected_slices(name):
    model = mf.apply(tiny_model(name))
    selected = {0: [1, 3], 1: [2]}
    if not mf.get_adapter(model).expert_layout.concatenated:
        with pytest.raises(TypeError, match=rf"{name} experts"):
            expert_slices.attach_expert_slices(model, selected)
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    before.update({n: b.detach().clone() for n, b in model.named_buffers()})
    params = expert_slices.attach_expert_slices(model, selected)
    assert len(params) == 2 * 3
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}  # shared experts frozen
    mf.set_expert_mask(model, mf.steering_mask(model, [(0, 5), (1, 4)]))
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
    expert_slices.detach_expert_slices(model)
    changed = set()
    fused_names = {}
    for layer, (gate_up, down) in enumerate(_fused_expert_tensors(model)):
        for tensor in (gate_up, down):
            fused_names[id(tensor)] = layer
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if n not in before:
            continue
        if id(p) in fused_names:
            rows = (p.detach() != before[n]).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert rows == selected[fused_names[id(p)]], (n, rows)
            changed.add(n)
        else:
            assert torch.equal(p.detach(), before[n]), f"{n} changed"
    assert len(changed) == 2 * 2


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_model_routes_like_stock(name):
    """In bfloat16 (DeepSeek-style routers still project and weigh in float32, Mixtral's weights stay float32):
    the same experts in every layer and the same logits."""
    stock = tiny_model(name).to(torch.bfloat16)
    ours = mf.apply(copy.deepcopy(stock))
    for mine, theirs in zip(capture_router_ids(ours, IDS), capture_router_ids(stock, IDS)):
        assert torch.equal(mine.sort(dim=1).values, theirs.sort(dim=1).values)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, stock(IDS).logits)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_other_backends_route_like_stock(name, backend):
    """The reference and the Triton kernel (CUDA, or the interpreter on CPU) inside each family's model: the stock
    experts and logits, and gradients that reach the routers."""
    from moe_fastmask.ops import resolve_backend

    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    try:
        resolve_backend(backend, torch.device(device))
    except ValueError as exc:
        pytest.skip(str(exc))
    stock = tiny_model(name).to(device)
    ours = mf.apply(copy.deepcopy(stock), backend=backend)
    ids = IDS[:2, :5].to(device)
    for mine, theirs in zip(capture_router_ids(ours, ids), capture_router_ids(stock, ids)):
        assert torch.equal(mine.sort(dim=1).values, theirs.sort(dim=1).values)
    torch.testing.assert_close(ours(ids).logits, stock(ids).logits, atol=1e-5, rtol=1e-5)
    ours(ids, labels=ids).loss.backward()
    stock(ids, labels=ids).loss.backward()
    for mine, theirs in zip(routers(ours), routers(stock)):
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_moe_layer_count_from_the_config(name):
    """The pipeline sizes masks from the config: the adapter's MoE layer count matches the model's MoE blocks,
    with dense layers placed by the family's own rule."""
    from moe_fastmask.pipeline.selection import model_sizes

    variants = [{}]
    if name in ("qwen2_moe", "qwen3_moe"):
        variants += [dict(mlp_only_layers=[0]), dict(num_hidden_layers=4, decoder_sparse_step=2)]
    if name in ("deepseek_v3", "glm4_moe"):
        variants += [dict(first_k_dense_replace=2, num_hidden_layers=4)]
    config_name, model_name, kwargs = FAMILIES[name]
    for extra in variants:
        config = getattr(transformers, config_name)(**COMMON, **{**kwargs, **extra})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(transformers, model_name)(config)
        adapter = mf.get_adapter(model)
        num_layers, num_experts, top_k = model_sizes(config)
        assert num_layers == len(adapter.moe_blocks(adapter.base_model(model))) == adapter.num_moe_layers(config)
        assert (num_experts, top_k) == (adapter.num_experts(routers(model)[0]), adapter.top_k(routers(model)[0]))


@pytest.fixture
def math_attention():
    """PyTorch's fused attention kernels (cuDNN, memory-efficient) fail with a misaligned address on CUDA (torch 2.11)
    for the tiny DeepSeek model's 8-wide latent heads with a padding mask; these tests are about routing, masks and
    training, so attention runs as plain math there. Nothing changes on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _pipeline_model(name: str, tokenizer, path):
    """A tiny random ``name`` model sized for the offline tokenizer, saved with it to ``path``; returns the model."""
    config_name, model_name, kwargs = FAMILIES[name]
    # DeepSeek's multi-head latent attention with padded batches needs as many key/value heads as query heads;
    # every family gets the same, so that the cases differ only in the family
    config = getattr(transformers, config_name)(
        **{**COMMON, "vocab_size": len(tokenizer), "num_key_value_heads": 4}, **kwargs,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, model_name)(config)
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def _analyze(name: str, tmp_path):
    """Demo data, the saved tiny model and ``analyze`` on it: (data file, model, model directory, analysis dir)."""
    from moe_fastmask.pipeline.analyze import AnalysisConfig, run_analysis
    from moe_fastmask.pipeline.demo import build_demo, build_offline_tokenizer

    _, data = build_demo(tmp_path / "demo", num_records=16)
    model = _pipeline_model(name, build_offline_tokenizer(), tmp_path / "model")
    run_analysis(AnalysisConfig(model=str(tmp_path / "model"), data=str(data), out=str(tmp_path / "analysis"),
                                num_batches=2, batch_size=8, max_new_tokens=4, progress=False, verbose=False))
    return data, model, tmp_path / "model", tmp_path / "analysis"


def _train(model_dir, analysis, out):
    from moe_fastmask.pipeline import train as tr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # three experts over two top-k layers leave a layer with fewer than k of them unmasked: the point here is
        # that only the selected rows change, not the masking
        return tr.train(tr.MaskedFinetuneArguments(
            model=str(model_dir), sft=str(analysis), out=str(out), top_n=3, batch_size=8, num_epochs=1,
            learning_rate=1e-2, device="cpu", seed=0, allow_unmasked=True))


def _changed_expert_rows(before, trained) -> set[tuple[int, int]]:
    """The (MoE layer, expert) rows of the fused expert tensors that differ from ``before``; every other parameter
    and buffer (the selection bias of sigmoid routers among them) must be unchanged."""
    fused = {id(t): layer for layer, tensors in enumerate(_fused_expert_tensors(trained)) for t in tensors}
    reference = {**dict(before.named_parameters()), **dict(before.named_buffers())}
    changed = set()
    for name, param in list(trained.named_parameters()) + list(trained.named_buffers()):
        diff = param.detach() != reference[name].detach()
        if id(param) in fused:
            changed |= {(fused[id(param)], e) for e in diff.flatten(1).any(dim=1).nonzero().flatten().tolist()}
        else:
            assert not diff.any(), f"{name} changed"
    return changed


@pytest.mark.usefixtures("math_attention")
@pytest.mark.parametrize("name", NAMES)
def test_analyze_train_evaluate(name, tmp_path):
    """analyze, train and evaluate on each family (DeepSeek-style models have the most to get wrong: a dense first
    layer, a sigmoid router with a selection bias and groups, shared experts): training changes only the selected
    experts' rows (GPT-OSS, whose experts are not fused bias-free tensors, is refused by name), and evaluate answers
    under every condition the run allows: before, steering (the base model with the selected experts off), after."""
    from moe_fastmask.pipeline.common import SELECTION_FILE
    from moe_fastmask.pipeline.evaluate import EvaluationArguments, evaluate
    from moe_fastmask.pipeline.selection import model_sizes, select_experts
    from moe_fastmask.pipeline.train.data import resolve_sft_paths

    data, model, model_dir, analysis = _analyze(name, tmp_path)
    paths = resolve_sft_paths(analysis)
    num_layers, num_experts, top_k = model_sizes(model.config)
    assert num_layers == 2
    if mf.get_adapter(model).expert_layout.concatenated:
        result = _train(model_dir, analysis, tmp_path / "train")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trained = transformers.AutoModelForCausalLM.from_pretrained(result.final_model)
        assert len(result.selection.experts) == 3
        changed = _changed_expert_rows(model, trained)
        assert changed and changed <= {(layer, e) for layer, e in result.selection.experts}
        after, selection_file = str(result.final_model), result.out / SELECTION_FILE
        conditions = {"before", "steering", "after"}
    else:
        assert name == "gpt_oss"
        with pytest.raises(TypeError, match=rf"the {name} experts"):
            _train(model_dir, analysis, tmp_path / "train")
        assert not (tmp_path / "train").exists()  # refused before anything is written
        from moe_fastmask.cli import main

        assert main(["train", "--model", str(model_dir), "--sft", str(analysis), "--out", str(tmp_path / "cli"),
                     "--device", "cpu"]) == 2  # one line, no traceback
        assert not (tmp_path / "cli").exists()
        selection = select_experts(paths["risk_table"], num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                                   top_n=3, warn=False)
        selection_file = tmp_path / SELECTION_FILE
        selection.save(selection_file)
        after, conditions = None, {"before", "steering"}
    assert selection_file.is_file()
    limit = 2
    evaluation = evaluate(EvaluationArguments(
        data=str(data), model=after, base_model=str(model_dir), selection=str(selection_file),
        split_file=str(paths["split"]), out=str(tmp_path / "evaluation"), steering=True, device="cpu", limit=limit,
        batch_size=limit, max_new_tokens=2), progress=False)
    assert set(evaluation.summary.condition) == conditions
    # each record is asked twice: its jailbreak prompt and its plain goal
    counts = evaluation.answers.groupby(["condition", "kind"]).size().to_dict()
    assert counts == {(c, kind): limit for c in conditions for kind in ("goal", "jailbreak")}
    assert evaluation.settings["num_steered_experts"] > 0
    assert set(evaluation.rates()) == conditions
    assert set(json.loads(evaluation.paths["json"].read_text())["results"]) == conditions
    written = [json.loads(line) for line in evaluation.paths["answers"].read_text().splitlines()]
    assert {row["condition"] for row in written} == conditions and len(written) == len(evaluation.answers)
