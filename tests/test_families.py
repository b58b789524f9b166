"""Every supported model family on a tiny random model built from its config class: the patched model equals the
stock one (logits, greedy generation, gradients), the recorder's counts equal a recount of the stock routers'
choices, a masked expert is never chosen, expert slices train exactly what the stock experts module's own autograd
would (weights and, for GPT-OSS, biases, in each family's stored layout), a short masked training step changes only
the selected expert slices, a saved trained model reloads with them, and the pipeline (analyze, train, evaluate)
runs end to end on each family."""

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
    return [ids for _, ids in capture_router_outputs(model, inputs)]


def capture_router_outputs(model, inputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[L] pairs (logits [T, E], ids [T, K]) of each MoE router in one forward of ``inputs``."""
    captured = []
    handles = [r.register_forward_hook(lambda m, a, out: captured.append((out[0].detach().clone(), out[2].detach().clone())))
               for r in routers(model)]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def assert_same_experts_up_to_ties(mine: torch.Tensor, theirs: torch.Tensor, selection_keys: torch.Tensor) -> None:
    """Each row chose the same experts, except where ``torch.topk`` (whose order among equal values is unspecified
    and differs between CPU builds) broke an exact tie of selection keys differently: then the experts that differ
    must hold equal keys, and ours are the lower indices (the tie rule)."""
    for row in (mine.sort(dim=1).values != theirs.sort(dim=1).values).any(dim=1).nonzero().flatten().tolist():
        only_mine = sorted(set(mine[row].tolist()) - set(theirs[row].tolist()))
        only_theirs = sorted(set(theirs[row].tolist()) - set(mine[row].tolist()))
        keys = selection_keys[row]
        assert torch.equal(keys[only_mine].sort().values, keys[only_theirs].sort().values), (
            f"row {row}: experts {only_mine} chosen instead of {only_theirs}, keys {keys.tolist()}")
        assert max(only_mine) < min(only_theirs), f"row {row}: tie broken to the higher index {only_mine}"


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
    """Per MoE layer, the fused expert tensors of the family's layout (weights, then biases where it has them)."""
    adapter = mf.get_adapter(model)
    names = adapter.expert_layout.tensor_names()
    return [tuple(getattr(m, n) for n in names) for m in adapter.experts_modules(adapter.base_model(model))]


def _randomize_experts(model) -> None:
    """Expert weights large enough that gate/up entries reach GPT-OSS' clamps (limit 7), and random biases (the
    families' initialisation leaves them 0, which would hide a missing bias term)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tensors in _fused_expert_tensors(model):
            for tensor in tensors:
                if tensor.dim() == 3:  # [E, in, out] or [E, out, in]: std 3 over gate/up, ~1 over down
                    std = (3.0 if tensor is tensors[0] else 1.0) / min(tensor.shape[1:]) ** 0.5
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))


def _busiest_experts(model, inputs, per_layer: int = 2) -> dict[int, list[int]]:
    """The ``per_layer`` experts each MoE layer chooses most often for ``inputs`` (so every one gets a gradient)."""
    return {layer: sorted(torch.bincount(ids.flatten()).argsort(descending=True)[:per_layer].tolist())
            for layer, ids in enumerate(capture_router_ids(model, inputs))}


def _slices(model, selected) -> dict[tuple[int, int, str], torch.Tensor]:
    """Every slice of ``selected``, keyed by (MoE layer, expert, name of its fused tensor)."""
    adapter = mf.get_adapter(model)
    names = adapter.expert_layout.tensor_names()
    modules = adapter.experts_modules(adapter.base_model(model))
    return {(layer, e, name): getattr(modules[layer], f"{prefix}{e}")
            for layer, experts in selected.items() for e in experts
            for prefix, name in zip(expert_slices.SLICE_PREFIXES, names)}


@pytest.mark.parametrize("name", NAMES)
def test_slices_train_like_the_stock_experts(name):
    """Slices attached (both experts paths), no mask: the stock logits, and the selected experts' weight and bias
    gradients equal what autograd through the stock experts module gives its fused tensors, row for row."""
    stock = tiny_model(name)
    stock.config._experts_implementation = "eager"  # the family's own experts loop
    _randomize_experts(stock)
    selected = _busiest_experts(stock, IDS)
    names = mf.get_adapter(stock).expert_layout.tensor_names()
    assert len(names) == (4 if name == "gpt_oss" else 2)
    ours = copy.deepcopy(stock)
    for param in stock.parameters():
        param.requires_grad_(param in {t for tensors in _fused_expert_tensors(stock) for t in tensors})
    out_stock = stock(IDS, labels=IDS)
    out_stock.loss.backward()
    fused_grads = _fused_expert_tensors(stock)
    results = {}
    for memory_efficient in (True, False):
        model = mf.apply(copy.deepcopy(ours))
        params = expert_slices.attach_expert_slices(model, selected, memory_efficient=memory_efficient)
        assert len(params) == len(names) * sum(map(len, selected.values()))
        out = model(IDS, labels=IDS)
        out.loss.backward()
        torch.testing.assert_close(out.logits, out_stock.logits, atol=1e-5, rtol=1e-5)
        grads = {key: param.grad for key, param in _slices(model, selected).items()}
        for (layer, e, tensor), grad in grads.items():
            want = fused_grads[layer][names.index(tensor)].grad[e]
            assert want.abs().sum() > 0, (layer, e, tensor)  # a chosen expert: a real comparison
            torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5, msg=f"{name} {(layer, e, tensor)}")
        assert all(t.grad is None for tensors in _fused_expert_tensors(model) for t in tensors)
        results[memory_efficient] = (out.logits.detach(), grads)
    # the memory-efficient path (frozen experts recomputed in backward) and the stock experts' path agree
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-6, rtol=1e-6)
    for key, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_masked_training_step_changes_only_selected_slices(name):
    model = mf.apply(tiny_model(name))
    selected = {0: [1, 3], 1: [2]}
    num_tensors = len(mf.get_adapter(model).expert_layout.tensor_names())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    before.update({n: b.detach().clone() for n, b in model.named_buffers()})
    params = expert_slices.attach_expert_slices(model, selected)
    assert len(params) == num_tensors * 3
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
    for layer, tensors in enumerate(_fused_expert_tensors(model)):
        for tensor in tensors:
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
    assert len(changed) == 2 * num_tensors


@pytest.mark.parametrize("slice_dtype", [None, torch.float64], ids=["views", "copies"])
@pytest.mark.parametrize("name", NAMES)
def test_saved_trained_model_reloads_with_the_trained_slices(name, slice_dtype, tmp_path):
    """A few AdamW steps on slices (views of the fused rows, or float64 copies written back on saving), then
    ``save_pretrained``: the checkpoint has no slice keys, and the reloaded model holds the trained rows in the
    family's stored layout and every other tensor unchanged."""
    model = tiny_model(name)
    _randomize_experts(model)
    mf.apply(model)
    selected = _busiest_experts(model, IDS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fused_before = [[t.detach().clone() for t in tensors] for tensors in _fused_expert_tensors(model)]
    params = expert_slices.attach_expert_slices(model, selected, dtype=slice_dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
    trained = {(layer, e, tensor): p.detach().clone() for (layer, e, tensor), p in _slices(model, selected).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    names = mf.get_adapter(model).expert_layout.tensor_names()
    fused = _fused_expert_tensors(reloaded)
    for (layer, e, tensor), value in trained.items():
        row = fused[layer][names.index(tensor)][e]
        assert torch.equal(row, value.to(row.dtype)), (layer, e, tensor)
        assert not torch.equal(row, fused_before[layer][names.index(tensor)][e]), (layer, e, tensor)  # trained
    fused_ids = {id(t) for tensors in fused for t in tensors}
    for n, p in reloaded.named_parameters():
        assert "fastmask" not in n
        if id(p) in fused_ids:
            rows = (p.detach() != before[n]).flatten(1).any(dim=1).nonzero().flatten().tolist()
            layer = next(layer for layer, tensors in enumerate(fused) if any(t is p for t in tensors))
            assert rows == selected[layer], (n, rows)
        else:
            assert torch.equal(p.detach(), before[n]), f"{n} changed"


@pytest.mark.parametrize("name", NAMES)
def test_kept_slice_keys_merge_into_the_plain_state_dict(name):
    """Sharded training's path: with ``keep_slice_keys`` the state dict holds the (float64) slices under their own
    keys, weights and biases alike; ``merge_expert_slices`` folds them into the fused rows, giving the state dict of
    the written-back model, and ``add_slice_entries`` takes them back out of a plain one."""
    model = tiny_model(name)
    _randomize_experts(model)
    mf.apply(model)
    selected = _busiest_experts(model, IDS)
    params = expert_slices.attach_expert_slices(model, selected, dtype=torch.float64)
    with torch.no_grad():
        for param in params:
            param.add_(0.25)
    expert_slices.keep_slice_keys(model)
    kept = {key: value.clone() for key, value in model.state_dict().items()}
    slice_keys = [key for key in kept if ".fastmask_" in key]
    assert len(slice_keys) == len(params) == len(mf.get_adapter(model).expert_layout.tensor_names()) * sum(
        map(len, selected.values()))
    merged = expert_slices.merge_expert_slices(kept)
    assert not any("fastmask" in key for key in merged)
    expert_slices.keep_slice_keys(model, False)
    plain = model.state_dict()  # written back by the pre-hook
    assert set(merged) == set(plain) and all(torch.equal(merged[k], plain[k]) for k in plain)
    names = mf.get_adapter(model).expert_layout.tensor_names()
    entries = expert_slices.add_slice_entries(dict(plain), model)
    for key in slice_keys:  # each trained slice is its fused row now, in the stored layout
        module, _, leaf = key.rpartition(".")
        prefix = next(p for p in expert_slices.SLICE_PREFIXES if leaf.startswith(p) and leaf[len(p):].isdigit())
        row = plain[f"{module}.{names[expert_slices.SLICE_PREFIXES.index(prefix)]}"][int(leaf[len(prefix):])]
        assert torch.equal(row, model.get_parameter(key).detach().to(row.dtype)), key
        assert torch.equal(entries[key], row), key


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_model_routes_like_stock(name):
    """In bfloat16 (DeepSeek-style routers still project and weigh in float32, Mixtral's weights stay float32):
    the same experts in every layer and the same logits."""
    stock = tiny_model(name).to(torch.bfloat16)
    ours = mf.apply(copy.deepcopy(stock))
    for router, (logits, mine), (stock_logits, theirs) in zip(
            routers(stock), capture_router_outputs(ours, IDS), capture_router_outputs(stock, IDS)):
        assert torch.equal(logits, stock_logits)
        keys = logits.float()  # bfloat16 logits tie exactly now and then: the family's selection keys decide
        if getattr(router, "e_score_correction_bias", None) is not None:
            keys = keys.sigmoid() + router.e_score_correction_bias.float()
        assert_same_experts_up_to_ties(mine, theirs, keys)
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
def test_reference_backend_routes_bit_for_bit_like_stock(name):
    """With the plain-PyTorch backend each family's router ids equal the stock router's, and the weights do to the
    bit (float32), compared expert by expert. DeepSeek-style routers return their top-k unsorted and renormalise by
    the sum in that order; ours sums in descending order, so their weights may differ in the last bits."""
    def outputs(model):
        captured = []
        handles = [r.register_forward_hook(lambda m, a, out: captured.append((out[1].detach().clone(),
                                                                              out[2].detach().clone())))
                   for r in routers(model)]
        with torch.no_grad():
            model(IDS)
        for handle in handles:
            handle.remove()
        return captured

    stock = tiny_model(name)
    ours = mf.apply(copy.deepcopy(stock), backend="torch")
    for (weights, ids), (stock_weights, stock_ids) in zip(outputs(ours), outputs(stock)):
        ids, order = ids.sort(dim=1)
        stock_ids, stock_order = stock_ids.sort(dim=1)
        assert torch.equal(ids, stock_ids)
        assert weights.dtype == stock_weights.dtype
        mine, theirs = weights.gather(1, order), stock_weights.gather(1, stock_order)
        if name in ("deepseek_v3", "glm4_moe"):
            torch.testing.assert_close(mine, theirs, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
        else:
            assert torch.equal(mine, theirs)


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
        base = adapter.base_model(model)
        moe_positions = [i for i, layer in enumerate(adapter.decoder_layers(base)) if adapter.is_moe_layer(layer)]
        assert adapter.moe_layer_indices(config) == moe_positions
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


def _train(model_dir, analysis, out, *, cli: bool = False):
    """Train three experts; returns (final model directory, selected (layer, expert) pairs). ``cli``: through
    ``moe-fastmask train`` (which must succeed), else through :func:`moe_fastmask.pipeline.train.train`."""
    from moe_fastmask.pipeline import train as tr
    from moe_fastmask.pipeline.common import FINAL_MODEL_DIR, SELECTION_FILE
    from moe_fastmask.pipeline.selection import ExpertSelection

    # three experts over two top-k layers leave a layer with fewer than k of them unmasked: the point here is
    # that only the selected rows change, not the masking
    settings = dict(top_n=3, batch_size=8, num_epochs=1, learning_rate=1e-2, device="cpu", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not cli:
            result = tr.train(tr.MaskedFinetuneArguments(
                model=str(model_dir), sft=str(analysis), out=str(out), allow_unmasked=True, **settings))
            return result.final_model, result.selection.experts
        from moe_fastmask.cli import main

        flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
        assert main(["train", "--model", str(model_dir), "--sft", str(analysis), "--out", str(out),
                     "--allow-unmasked", "--no-progress", *flags]) == 0
    return out / FINAL_MODEL_DIR, ExpertSelection.load(out / SELECTION_FILE).experts


def _changed_expert_rows(before, trained) -> dict[tuple[int, int], set[str]]:
    """The (MoE layer, expert) rows of the fused expert tensors that differ from ``before``, each with the names of
    the tensors whose row changed; every other parameter and buffer (the selection bias of sigmoid routers among
    them) must be unchanged."""
    fused = {id(t): layer for layer, tensors in enumerate(_fused_expert_tensors(trained)) for t in tensors}
    reference = {**dict(before.named_parameters()), **dict(before.named_buffers())}
    changed: dict[tuple[int, int], set[str]] = {}
    for name, param in list(trained.named_parameters()) + list(trained.named_buffers()):
        diff = param.detach() != reference[name].detach()
        if id(param) in fused:
            for e in diff.flatten(1).any(dim=1).nonzero().flatten().tolist():
                changed.setdefault((fused[id(param)], e), set()).add(name.rpartition(".")[2])
        else:
            assert not diff.any(), f"{name} changed"
    return changed


@pytest.mark.usefixtures("math_attention")
@pytest.mark.parametrize("name", NAMES)
def test_analyze_train_evaluate(name, tmp_path):
    """analyze, train and evaluate on each family (DeepSeek-style models have the most to get wrong: a dense first
    layer, a sigmoid router with a selection bias and groups, shared experts; GPT-OSS transposed, interleaved,
    biased experts, trained here through the command line): training changes only the selected experts' rows (for
    GPT-OSS, of the weights and the biases), and evaluate answers under every condition: before, steering (the base
    model with the selected experts off), after."""
    from moe_fastmask.pipeline.common import FINAL_MODEL_DIR, SELECTION_FILE
    from moe_fastmask.pipeline.evaluate import EvaluationArguments, evaluate
    from moe_fastmask.pipeline.selection import model_sizes
    from moe_fastmask.pipeline.train.data import resolve_sft_paths

    data, model, model_dir, analysis = _analyze(name, tmp_path)
    paths = resolve_sft_paths(analysis)
    num_layers, num_experts, top_k = model_sizes(model.config)
    assert num_layers == 2
    final_model, experts = _train(model_dir, analysis, tmp_path / "train", cli=name == "gpt_oss")
    assert final_model == tmp_path / "train" / FINAL_MODEL_DIR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = transformers.AutoModelForCausalLM.from_pretrained(final_model)
    assert len(experts) == 3
    changed = _changed_expert_rows(model, trained)
    assert changed and set(changed) <= {(layer, e) for layer, e in experts}
    names = set(mf.get_adapter(trained).expert_layout.tensor_names())  # GPT-OSS: the biases too
    assert all(tensors == names for tensors in changed.values()), changed
    after, selection_file = str(final_model), tmp_path / "train" / SELECTION_FILE
    conditions = {"before", "steering", "after"}
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


# (DeepSeek-V3's attention, whose keys and values differ in width, fails in transformers' own static cache)
@pytest.mark.parametrize("name", [name for name in NAMES if name != "deepseek_v3"])
def test_static_cache_generate_records_like_dynamic(name):
    """generate with a static cache prepares its masks itself (a dict of them per attention type for models with
    ``layer_types``: GPT-OSS, Qwen2-MoE): the same tokens and counts as with the dynamic cache, padding excluded."""
    model = mf.apply(tiny_model(name))
    ids = IDS.clone()
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    results = []
    for cache_implementation in (None, "static"):
        rec = mf.RoutingRecorder(model, num_groups=2)
        with torch.no_grad(), rec.record(GROUPS, eos_token_id=[]):
            sequences = model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                                       pad_token_id=0, eos_token_id=None, cache_implementation=cache_implementation)
        results.append((sequences, rec))
    (dynamic_seq, dynamic), (static_seq, static) = results
    assert torch.equal(static_seq, dynamic_seq)
    assert dynamic.prefill_tokens.tolist() == [int(attention_mask[[0, 2]].sum()), int(attention_mask[1].sum())]
    for attr in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert torch.equal(getattr(static, attr), getattr(dynamic, attr)), attr


SLIDING = {"gpt_oss": {}, "mixtral": {}, "qwen3_moe": {"use_sliding_window": True}}


@pytest.mark.parametrize("name", list(SLIDING))
def test_graph_engine_equals_generate_with_sliding_windows(name):
    """Sliding-window attention (GPT-OSS' alternating layers; Mixtral and Qwen3-MoE with ``sliding_window``) in the
    static-cache engine, with prompts and generations longer than the window: the tokens and counts of generate."""
    from moe_fastmask.pipeline.generation import GenerationRequest, SamplingSettings
    from moe_fastmask.pipeline.generation.engine import StaticCacheEngine

    config_name, model_name, kwargs = FAMILIES[name]

    def build(window):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = getattr(transformers, config_name)(**COMMON, **{**kwargs, **SLIDING[name], "sliding_window": window})
            model = getattr(transformers, model_name)(config).eval()
        model.config._experts_implementation = "eager"
        return model

    prompts = [list(range(5, 14)), list(range(20, 25)), list(range(30, 37))]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = (ids != 0).long()
    model, wide = build(4), build(64)
    with torch.no_grad():  # the window changes the outputs of these prompts
        assert not torch.allclose(model(ids, attention_mask=attention_mask).logits,
                                  wide(ids, attention_mask=attention_mask).logits)
    mf.apply(model)
    eos, groups = 95, [0, 1, 0]
    rec = mf.RoutingRecorder(model, num_groups=2)
    with torch.no_grad(), rec.record(groups, eos_token_id=eos):
        sequences = model.generate(ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0, eos_token_id=eos)
    expected = [row[: row.index(eos)] if eos in row else row for row in sequences[:, width:].tolist()]
    engine = StaticCacheEngine(model, eos_token_id=eos, pad_token_id=0, cache_multiple=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = engine.generate(GenerationRequest(
            prompts=prompts, sampling=SamplingSettings(max_new_tokens=6), groups=groups, num_groups=2))
    assert out.tokens == expected
    for attr in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert (getattr(out, attr) == getattr(rec, attr).cpu().numpy()).all(), attr
