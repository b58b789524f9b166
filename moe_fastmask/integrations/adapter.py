"""What differs between MoE model families, in one place per family: the :class:`MoEAdapter` interface.

The generic code (the patched router forward, the token-group pre-hook, masks, the recorder, expert slices) never
names a model class; it asks the model's adapter. An adapter says

* where things are: the base model holding the decoder layers, the MoE blocks among those layers (families with
  dense layers, e.g. DeepSeek-V3's first ``first_k_dense_replace`` layers, skip them), each block's router and
  experts module, and the RMSNorm classes whose forward :class:`moe_fastmask.ops.RMSNormFunction` reproduces;
* the router semantics, as data (:class:`RouterSemantics`): scoring function, softmax before or after top-k,
  renormalisation, selection bias, group-limited top-k, scaling factor, shared experts;
* the experts' weight layout, as data (:class:`ExpertLayout`), and the gated activation of one expert
  (:meth:`MoEAdapter.expert_glu`), from which the generic code runs an expert MLP on given weights;
* how the router computes its logits and what its forward returns;
* the transformers versions whose modeling code it was written against.

Masks, counts and steering index MoE layers by their position among the model's MoE blocks (for OLMoE, where every
decoder layer is an MoE layer, that is the decoder layer index). A new family is one module with a subclass and one
line in :mod:`moe_fastmask.integrations.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from moe_fastmask.ops.expert_mlp import ExpertMLP, GatedActivation


@dataclass(frozen=True)
class RouterSemantics:
    """How a router turns logits into ``(weights, expert ids)``.

    ``scoring``: ``"softmax"`` or ``"sigmoid"`` of the logits. ``softmax_after_topk``: top-k runs on the raw logits
    and the softmax over the chosen k only (GPT-OSS); otherwise over all experts first (OLMoE, Mixtral, Qwen-MoE).
    ``renormalize``: the top-k weights are divided by their sum (``norm_topk_prob``). ``selection_bias``: a
    per-expert bias added to the scores for choosing only (DeepSeek-V3's ``e_score_correction_bias``).
    ``num_groups`` / ``topk_groups``: group-limited top-k (experts split into ``num_groups`` groups, the best
    ``topk_groups`` groups eligible). ``scaling_factor``: the final weights are multiplied by it.
    ``shared_experts``: the MoE block also runs always-on experts next to the routed ones (untouched by routing).
    """

    scoring: Literal["softmax", "sigmoid"] = "softmax"
    softmax_after_topk: bool = False
    renormalize: bool = False
    selection_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    scaling_factor: float = 1.0
    shared_experts: bool = False

    def unsupported_by_route(self) -> list[str]:
        """What :func:`moe_fastmask.route` cannot do among these semantics (argument ranges are checked by
        :func:`moe_fastmask.ops.check_route_args` on the router's shape when the model is patched)."""
        problems = []
        if self.scoring not in ("softmax", "sigmoid"):
            problems.append(f"scoring={self.scoring!r}")
        if self.softmax_after_topk and (self.scoring != "softmax" or self.renormalize):
            problems.append("softmax after top-k with sigmoid scoring or renormalisation")
        if self.selection_bias and self.scoring != "sigmoid":
            problems.append("a selection bias without sigmoid scoring")
        if self.num_groups > 1 and self.scoring != "sigmoid":
            problems.append(f"group-limited top-k ({self.num_groups} groups) without sigmoid scoring")
        return problems

    def route_kwargs(self) -> dict:
        """The variant keyword arguments of :func:`moe_fastmask.route` for these semantics (without the bias
        tensor, which the adapter's :meth:`MoEAdapter.selection_bias` reads from the router on every call)."""
        return dict(
            scoring="softmax_chosen" if self.softmax_after_topk else self.scoring,
            n_group=self.num_groups,
            topk_group=self.topk_groups,
            scale=float(self.scaling_factor),
        )


@dataclass(frozen=True)
class ExpertLayout:
    """How an experts module stores its weights.

    ``gate_up`` / ``down``: attribute names of the fused tensors. Not ``transposed``: ``gate_up [E, 2I, H]`` and
    ``down [E, H, I]`` (``y = x @ W.T``); ``transposed``: ``[E, H, 2I]`` and ``[E, I, H]`` (``y = x @ W``, GPT-OSS).
    ``interleaved``: gate and up columns of the gate/up projection alternate (GPT-OSS) instead of all gate columns
    then all up columns. ``has_bias``: per-expert biases next to the weights, ``gate_up_bias [E, 2I]`` and
    ``down_bias [E, H]`` (attribute names), added after each projection.
    """

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False
    interleaved: bool = False
    has_bias: bool = False
    gate_up_bias: str = "gate_up_proj_bias"
    down_bias: str = "down_proj_bias"

    def tensor_names(self) -> tuple[str, ...]:
        """The fused tensors of one experts module, in the order expert slices keep per expert: ``gate_up``,
        ``down``, then (``has_bias``) ``gate_up_bias``, ``down_bias``."""
        names = (self.gate_up, self.down)
        return names + (self.gate_up_bias, self.down_bias) if self.has_bias else names


class MoEAdapter:
    """One model family's answers to what the generic integration code needs (see the module docstring).

    Subclasses set ``model_type`` (``config.model_type``), ``expert_layout`` and implement :meth:`base_model_class`,
    :meth:`router_class` and :meth:`router_semantics`; the defaults below fit the transformers 5.x layout shared by
    OLMoE, Mixtral, Qwen2/3-MoE and DeepSeek-V3 (``base.layers[i].mlp.gate`` / ``.mlp.experts``).
    """

    model_type: ClassVar[str] = ""
    min_transformers: ClassVar[str] = "5.0.0"
    max_transformers: ClassVar[str] = "6.0.0"  # exclusive
    block_attr: ClassVar[str] = "mlp"
    router_attr: ClassVar[str] = "gate"
    experts_attr: ClassVar[str] = "experts"
    expert_layout: ClassVar[ExpertLayout] = ExpertLayout()

    # ---- versions ------------------------------------------------------------------------------------------
    def check_transformers(self) -> None:
        """Raise if the installed transformers is outside the range this adapter's modeling code matches."""
        import transformers
        from packaging.version import Version

        version = Version(transformers.__version__)
        if not Version(self.min_transformers) <= version < Version(self.max_transformers):
            raise RuntimeError(
                f"moe_fastmask's {self.model_type} integration supports transformers >= {self.min_transformers}, "
                f"< {self.max_transformers}; found {transformers.__version__}"
            )

    # ---- where things are ----------------------------------------------------------------------------------
    def base_model_class(self) -> type[nn.Module]:
        """The transformers class holding the decoder ``layers`` (e.g. ``OlmoeModel``)."""
        raise NotImplementedError

    def router_class(self) -> type[nn.Module]:
        """The transformers router class of an MoE block (e.g. ``OlmoeTopKRouter``)."""
        raise NotImplementedError

    def norm_classes(self) -> tuple[type[nn.Module], ...]:
        """RMSNorm classes computing ``weight * (x_fp32 * rstd).to(x.dtype)`` with ``variance_epsilon``, which
        :class:`moe_fastmask.ops.RMSNormFunction` reproduces bit for bit; empty when the family's norm differs."""
        return ()

    def base_model(self, model: nn.Module) -> nn.Module:
        """The base model of a causal LM, of a base model itself or of a wrapper around either."""
        cls = self.base_model_class()
        if isinstance(model, cls):
            return model
        for module in model.modules():
            if isinstance(module, cls):
                return module
        raise TypeError(f"expected a {self.model_type} model holding a {cls.__name__}, got {type(model).__name__}")

    def decoder_layers(self, base: nn.Module) -> nn.ModuleList:
        """The decoder layers of the base model, in order (dense and MoE)."""
        return base.layers

    def is_moe_layer(self, layer: nn.Module) -> bool:
        """False for dense decoder layers of families mixing them in; every layer is an MoE layer by default."""
        return True

    def moe_layer_indices(self, config) -> list[int]:
        """The decoder-layer indices of the MoE layers of a model of ``config``, from the config alone (engines
        that report every decoder layer, dense ones included, keep these); every decoder layer by default."""
        return list(range(int(config.num_hidden_layers)))

    def num_moe_layers(self, config) -> int:
        """How many MoE layers a model of ``config`` has (the length of :meth:`moe_blocks`), from the config alone."""
        return len(self.moe_layer_indices(config))

    def moe_blocks(self, base: nn.Module) -> list[nn.Module]:
        """The MoE blocks (router + experts) in layer order; their positions are the MoE layer indices."""
        blocks = []
        for idx, layer in enumerate(self.decoder_layers(base)):
            if not self.is_moe_layer(layer):
                continue
            block = getattr(layer, self.block_attr, None)
            router = getattr(block, self.router_attr, None)
            if not isinstance(router, self.router_class()):
                raise TypeError(
                    f"layer {idx}: {self.block_attr}.{self.router_attr} is {type(router).__name__}, not "
                    f"{self.router_class().__name__}; moe_fastmask supports the transformers layout of "
                    f"{self.model_type} in transformers >= {self.min_transformers}, < {self.max_transformers}"
                )
            blocks.append(block)
        return blocks

    def router(self, block: nn.Module) -> nn.Module:
        """The router (gate) module of one MoE block."""
        return getattr(block, self.router_attr)

    def experts(self, block: nn.Module) -> nn.Module:
        """The experts module of one MoE block."""
        return getattr(block, self.experts_attr)

    def routers(self, base: nn.Module) -> list[nn.Module]:
        """Every MoE layer's router, in MoE-layer order."""
        return [self.router(block) for block in self.moe_blocks(base)]

    def experts_modules(self, base: nn.Module) -> list[nn.Module]:
        """Every MoE layer's experts module, in MoE-layer order."""
        return [self.experts(block) for block in self.moe_blocks(base)]

    # ---- the router --------------------------------------------------------------------------------------------
    def num_experts(self, router: nn.Module) -> int:
        """How many routed experts the router chooses among (E)."""
        return int(router.num_experts)

    def top_k(self, router: nn.Module) -> int:
        """How many experts the router picks per token."""
        return int(router.top_k)

    def router_semantics(self, router: nn.Module) -> RouterSemantics:
        """How the family's router turns logits into weights (softmax or sigmoid, renormalisation, scaling); each
        adapter says."""
        raise NotImplementedError

    def router_logits(self, router: nn.Module, hidden_states: Tensor) -> Tensor:
        """``[T, E]`` logits exactly as the stock router forward computes them."""
        return F.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)

    def route_input(self, router: nn.Module, logits: Tensor) -> Tensor:
        """The tensor :func:`moe_fastmask.route` runs on, from the logits; its dtype is the routed weights' dtype
        (e.g. ``logits.float()`` for a router whose weights stay float32 on a bfloat16 model)."""
        return logits

    def selection_bias(self, router: nn.Module) -> Tensor | None:
        """The router's per-expert selection bias ``[E]`` when its semantics have one (read on every call, so
        updates to it take effect)."""
        return None

    def router_output(self, router: nn.Module, logits: Tensor, weights: Tensor, ids: Tensor) -> tuple:
        """What the stock router forward returns, from the logits and the routed ``weights`` / ``ids``."""
        return logits, weights, ids

    # ---- the experts -------------------------------------------------------------------------------------------
    def expert_activation(self, experts: nn.Module) -> Callable[[Tensor], Tensor]:
        """The gate activation of a gated expert MLP ``down(act(gate(x)) * up(x))``."""
        return experts.act_fn

    def expert_glu(self, experts: nn.Module) -> Callable[[Tensor], Tensor]:
        """The gated activation from one expert's gate/up projection output ``[N, 2I]`` (bias added) to the down
        projection's input ``[N, I]``: ``act(gate) * up`` with gate and up columns as :attr:`expert_layout` arranges
        them, by default; a family with another activation overrides this."""
        return GatedActivation(self.expert_activation(experts), interleaved=self.expert_layout.interleaved)

    def expert_mlp_spec(self, experts: nn.Module) -> ExpertMLP:
        """How one expert of ``experts`` computes, for :class:`moe_fastmask.ops.SlicedExpertsFunction`: the
        layout's orientation and :meth:`expert_glu`."""
        return ExpertMLP(glu=self.expert_glu(experts), transposed=self.expert_layout.transposed)

    def expert_mlp(
        self, experts: nn.Module, x: Tensor, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None = None,
        down_bias: Tensor | None = None,
    ) -> Tensor:
        """One expert's MLP on rows ``x [N, H]`` with its weights ``gate_up`` / ``down`` (and biases, when the
        layout has them): rows of the fused tensors, or trainable copies of them, in the layout of
        :attr:`expert_layout`."""
        return self.expert_mlp_spec(experts).forward(x, gate_up, down, gate_up_bias, down_bias)
