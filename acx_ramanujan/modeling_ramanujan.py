"""Ramanujan decoder: RMSNorm → rotary → attention → MLP → MoE → decoder layer → pretrained base → heads.

A pre-norm Llama-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU) with an optional dropless top-k
mixture of experts. Attention runs through Transformers' attention interface (eager, sdpa, flash, flex),
masks through `masking_utils`, the KV cache through `cache_utils`. What is ours: the per-layer weight
initialization (`initialization_ramanujan`), the seed's per-layer attention temperature, and the depth schemes
(a constant residual-branch multiplier, LayerNorm Scaling, DeepNorm's post-norm layers).
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_kernel_forward_from_hub, use_kernelized_func
from transformers.integrations.moe import (
    batched_mm_experts_forward,
    grouped_mm_experts_forward,
    use_experts_implementation,
)
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_tracing
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_ramanujan import RamanujanConfig
from .initialization_ramanujan import (
    OUTPUT_PROJECTIONS,
    attention_scaling,
    deepnorm_alpha,
    layernorm_scale,
    residual_multiplier,
    scheme_for_role,
    weight_std,
)

# Transformers 5.24 renamed the KV cache `past_key_values` → `cache` everywhere at once: `generate()` passes `cache=`,
# outputs carry `.cache`, `create_causal_mask` and `GradientCheckpointingLayer` read `cache`. Earlier 5.x releases
# use `past_key_values` in all four places. Our forwards take `cache` and also accept `past_key_values`
# (`accepts_past_key_values`); CACHE_NAME is the installed release's name, used wherever we hand the cache to
# Transformers. Reading `output.past_key_values` on 5.24 logs a deprecation warning, so code that must run on both
# reads `getattr(output, CACHE_NAME)`.
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def accepts_past_key_values(forward: Callable) -> Callable:
    """Let a `forward(..., cache=...)` also be called with `past_key_values=`, as Llama is on the installed release.

    Where `cache` is the release's name, through the `deprecate_kwarg` Llama uses (its FutureWarning included); on
    earlier releases silently, since their own `generate()` passes `past_key_values`.
    """
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if "past_key_values" in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("pass the KV cache once, as `cache` (or `past_key_values`), not as both")
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(self, *args, **kwargs)

    return wrapper


@use_kernel_forward_from_hub("RMSNorm")
class RamanujanRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): weight · x·rsqrt(mean(x²) + ε), normalized in float32 and cast back before the
    weight, as Llama's. Same math, attributes and forward signature as `LlamaRMSNorm`, so it carries Llama's Hub-kernel
    name: where `from_pretrained` applies Hub kernels (5.25+, `kernels` installed), Llama's fused kernel replaces it.
    (So nothing else may live here: LayerNorm Scaling's factor is applied by the decoder layer, not by the norm.)"""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
        return self.weight * normed.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def default_rope_parameters(config: RamanujanConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
    """inv_freq = 1 / θ^(2i/d) (Su et al. 2021), θ from `config.rope_parameters["rope_theta"]`."""
    base = config.rope_parameters["rope_theta"]
    dim = config.head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    return inv_freq, 1.0


class RamanujanRotaryEmbedding(nn.Module):
    """Rotary tables; other rope types (linear, dynamic, yarn, llama3 …) come from Transformers' registry."""

    def __init__(self, config: RamanujanConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    def compute_inv_freq(self, config: RamanujanConfig, device=None) -> tuple[torch.Tensor, float]:
        rope_init_fn: Callable = default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        return rope_init_fn(config, device)

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@use_kernel_forward_from_hub("rotary_pos_emb")  # Llama's name and arguments: its Hub kernel stands in for this
def apply_rotary_pos_emb(q, k, cos, sin):
    """q, k: (batch, heads, seq, head_dim); cos, sin: (batch, seq, head_dim)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, d) → (batch, kv_heads·n_rep, seq, d), as `torch.repeat_interleave` on dim 1."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention: softmax(QKᵀ·scaling + mask)·V, softmax in float32. Returns the weights too."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


@use_kernelized_func(apply_rotary_pos_emb)  # makes the rotary function visible to Hub kernelization, as in Llama
class RamanujanAttention(nn.Module):
    """GQA self-attention with rotary positions and the seed's per-layer temperature; with `config.qk_norm`, each
    head of q and k RMS-normalized over head_dim before RoPE, as Qwen3's attention does (same names and order)."""

    def __init__(self, config: RamanujanConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = attention_scaling(
            self.head_dim, layer_idx, config.attention_scale_alpha, config.attention_scale_decay
        )
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RamanujanRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RamanujanRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class RamanujanMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(act(gate(x)) · up(x))."""

    def __init__(self, config: RamanujanConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RamanujanRouter(nn.Linear):
    """Router: hidden → one logit per expert. Its own class so `router_logits` can be recorded."""

    def __init__(self, config: RamanujanConfig):
        super().__init__(config.hidden_size, config.num_experts, bias=False)


def on_accelerator(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lives where reading its values back to the host stalls a device (anything but the CPU)."""
    return tensor.device.type != "cpu"


@use_experts_implementation
class RamanujanExperts(nn.Module):
    """All experts of one layer as fused 3-D weights, the layout of Transformers v5 MoE models.

    gate_up_proj: (num_experts, 2·moe_intermediate_size, hidden); down_proj: (num_experts, hidden, moe_intermediate).
    The eager forward ("eager", our default) is dropless and computes each token only for its own top-k experts. On
    CPU, assignments are sorted by expert, gathered once, run through each expert's contiguous slice, weighted and
    scattered back. Sizing those slices reads the per-expert counts back to the host: free on CPU, but a stall per
    layer per step on an accelerator, and impossible inside a compiled graph or a CUDA graph capture. So:
    - on an accelerator it runs Transformers' "grouped_mm", Qwen3-MoE's default there (histc instead of bincount,
      so capture-safe; it also drops expert parallelism's out-of-range ids). Chosen by following upstream, not by a
      measurement: no GPU was at hand here;
    - on CPU while a graph is traced (Transformers' `is_tracing`: torch.compile, export, jit or fx tracing, and stream
      capture, whose tensors are an accelerator's in practice), and under expert parallelism (whose dispatch can send
      the out-of-range id `num_experts` with weight 0), it runs Transformers' "batched_mm": the same sums over each
      token's top-k experts, with shapes that do not depend on the routing.
    """

    def __init__(self, config: RamanujanConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if on_accelerator(hidden_states):
            return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if is_tracing(hidden_states) or self._is_expert_parallel:
            return batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        top_k = top_k_index.shape[-1]
        flat_experts = top_k_index.reshape(-1)
        order = flat_experts.argsort(stable=True)
        token_of_assignment = order // top_k
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        # Under autocast, the routed tokens and the weights are cast once here rather than by autocast in every
        # expert's F.linear: the same values, but per-expert casts made a bf16 step slower than fp32 at small widths.
        device_type = hidden_states.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden_states.dtype
        # index_select, not `hidden_states[index]`: its backward is an index_add, cheaper on CPU than index_put.
        routed = hidden_states.index_select(0, token_of_assignment).to(dtype)
        # unbind, not `weight[expert]`: each indexing's backward would write a full-size zero gradient (cost ∝ E²).
        per_expert = zip(routed.split(counts), self.gate_up_proj.to(dtype).unbind(0), self.down_proj.to(dtype).unbind(0))
        outputs = []
        for tokens, gate_up_proj, down_proj in per_expert:
            if tokens.shape[0] == 0:
                continue
            gate, up = F.linear(tokens, gate_up_proj).chunk(2, dim=-1)
            outputs.append(F.linear(self.act_fn(gate) * up, down_proj))
        assignment_weights = top_k_weights.reshape(-1).index_select(0, order)[:, None].to(hidden_states.dtype)
        expert_out = torch.cat(outputs) * assignment_weights
        return torch.zeros_like(hidden_states).index_add_(0, token_of_assignment, expert_out)


class RamanujanSparseMoeBlock(nn.Module):
    """Softmax router, top-k experts (renormalized when norm_topk_prob), plus optional always-on shared experts.

    `e_score_correction_bias` (DeepSeek-V3's name) is the per-expert bias of auxiliary-loss-free load balancing
    (Wang et al. 2024; DeepSeek-V3 report §2.1.2): added to the routing probabilities only to choose the top k,
    while the gating weights stay the unbiased probabilities. It is a buffer, not a parameter: no gradient moves
    it, `update_router_biases` does, from the choices counted here in training forwards (when
    `config.router_bias_update_rate` > 0). Every MoE layer has one, so checkpoints have one layout whatever the rate;
    zero, it changes nothing. It lives here rather than on the router so that PEFT, which wraps every `nn.Linear`
    (the router too) with "all-linear", leaves it in place. The recorded `router_logits` stay the plain logits, as
    Qwen3-MoE's and Mixtral's. The counts are a plain tensor, not a buffer: DDP broadcasts buffers from rank 0 at
    every forward, which would overwrite each process's own counts between accumulation micro-batches.
    """

    def __init__(self, config: RamanujanConfig):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router = RamanujanRouter(config)
        self.experts = RamanujanExperts(config)
        self.shared_experts = (
            RamanujanMLP(config, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts > 0
            else None
        )
        self.e_score_correction_bias = nn.Buffer(torch.zeros(config.num_experts, dtype=torch.float32))
        self.assignment_counts: torch.Tensor | None = None  # top-k choices per expert since the last update

    @property
    def bias_update_rate(self) -> float:
        return getattr(self.config, "router_bias_update_rate", 0.0)

    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids) of each token's top k: chosen by `probs + bias`, weighted by `probs` themselves.

        With a zero bias this is `torch.topk(probs, k)` bit for bit (adding +0.0 changes no value). In training
        with a positive rate the choices are counted; a gradient-checkpointing recompute counts a layer's choices
        twice, which leaves the sign of every (mean − count), all the update reads, unchanged.
        """
        top_k_index = torch.topk(probs + self.e_score_correction_bias, self.top_k, dim=-1).indices
        if self.training and self.bias_update_rate > 0:
            self.count(top_k_index)
        return probs.gather(-1, top_k_index), top_k_index

    @torch.no_grad()
    def count(self, top_k_index: torch.Tensor) -> None:
        flat = top_k_index.reshape(-1)
        if self.assignment_counts is None or self.assignment_counts.device != flat.device:
            self.assignment_counts = torch.zeros(self.e_score_correction_bias.numel(), dtype=torch.long,
                                                 device=flat.device)
        self.assignment_counts.index_add_(0, flat, torch.ones_like(flat))

    def take_counts(self) -> torch.Tensor:
        """The counts since the last call (zeros if none), on the bias's device; counting starts afresh."""
        counts, self.assignment_counts = self.assignment_counts, None
        if counts is None:
            return torch.zeros_like(self.e_score_correction_bias, dtype=torch.long)
        return counts.to(self.e_score_correction_bias.device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)
        router_logits = self.router(flat)
        routing_weights = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = self.select(routing_weights)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        output = self.experts(flat, top_k_index, top_k_weights.to(flat.dtype))
        if self.shared_experts is not None:
            output = output + self.shared_experts(flat)
        return output.reshape(batch_size, sequence_length, hidden_dim)


@torch.no_grad()
def update_router_biases(model: nn.Module) -> None:
    """One auxiliary-loss-free balancing step for every MoE layer of `model` (DeepSeek-V3 report §2.1.2):
    b_e ← b_e + γ·sign(mean load − load_e), the loads being the top-k assignments counted since the last call.

    Call it once per optimizer step. Overloaded experts are pushed down, underloaded ones up, by γ =
    `config.router_bias_update_rate`; nothing happens when γ is 0. Under torch.distributed the counts are summed
    over processes first, so every process applies the same update and the biases stay identical. The sign is
    computed in integers, as sign(Σ_e load_e − E·load_e), so it is exact at any count.
    """
    blocks = [module for module in model.modules()
              if isinstance(module, RamanujanSparseMoeBlock) and module.bias_update_rate > 0]
    if not blocks:
        return
    counts = torch.stack([block.take_counts() for block in blocks])
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(counts)
    direction = torch.sign(counts.sum(dim=-1, keepdim=True) - counts.shape[-1] * counts)
    for block, step in zip(blocks, direction):
        bias = block.e_score_correction_bias
        bias.add_(step.to(bias.dtype), alpha=block.bias_update_rate)


def router_biases(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each MoE layer's `e_score_correction_bias`, in layer order: the order of the recorded `router_logits`."""
    blocks = (module for module in model.modules() if isinstance(module, RamanujanSparseMoeBlock))
    return tuple(block.e_score_correction_bias for block in blocks)


class RamanujanDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + m·attn(norm(x)), then x + m·ffn(norm(x)); the ffn is an MLP or an MoE block.

    m is the depth parametrization's constant branch multiplier (1, and no multiplication, without one); under
    LayerNorm Scaling both norms' outputs are × 1/√(l+1). With `config.deepnorm` the block is DeepNet's post-norm
    one instead: x ← norm(α·x + attn(x)), then x ← norm(α·x + ffn(x)), α = (2L)^(1/4)
    (`initialization_ramanujan.deepnorm_alpha`; torchscale's `DecoderLayer.residual_connection`). The model keeps its
    final norm there, which torchscale's post-norm decoder does not have (`layer_norm` is None unless
    `decoder_normalize_before`): its input already has RMS 1 at init (the last layer's norm, weights 1), so there it
    rescales the stream by 1 + O(rms_norm_eps); it keeps one layout (and checkpoint keys) for every config.
    """

    def __init__(self, config: RamanujanConfig, layer_idx: int):
        super().__init__()
        self.self_attn = RamanujanAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = RamanujanSparseMoeBlock(config)
        else:
            self.mlp = RamanujanMLP(config, config.intermediate_size)
        self.input_layernorm = RamanujanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RamanujanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layer_idx = layer_idx
        scale = layernorm_scale(config, layer_idx)
        self.norm_scale = None if scale == 1.0 else scale
        self.branch_multiplier = residual_multiplier(config)
        self.deepnorm_alpha = deepnorm_alpha(config.num_hidden_layers) if config.deepnorm else None

    @accepts_past_key_values  # the model passes the cache as CACHE_NAME: the name gradient checkpointing drops
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        def attention(inputs: torch.Tensor) -> torch.Tensor:
            return self.self_attn(inputs, position_embeddings=position_embeddings, attention_mask=attention_mask,
                                  cache=cache, **kwargs)[0]

        if self.deepnorm_alpha is not None:
            hidden_states = self.input_layernorm(self.deepnorm_alpha * hidden_states + attention(hidden_states))
            return self.post_attention_layernorm(self.deepnorm_alpha * hidden_states + self.mlp(hidden_states))
        hidden_states = hidden_states + self.branch(attention(self.scaled(self.input_layernorm(hidden_states))))
        return hidden_states + self.branch(self.mlp(self.scaled(self.post_attention_layernorm(hidden_states))))

    def scaled(self, normed: torch.Tensor) -> torch.Tensor:
        """A pre-norm's output as the branch reads it: × LayerNorm Scaling's 1/√(l+1), if on."""
        return normed if self.norm_scale is None else self.norm_scale * normed

    def branch(self, output: torch.Tensor) -> torch.Tensor:
        """A branch's output as it joins the residual stream: × the depth parametrization's multiplier, if any."""
        return output if self.branch_multiplier is None else self.branch_multiplier * output


class RamanujanPreTrainedModel(PreTrainedModel):
    config: RamanujanConfig
    config_class = RamanujanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RamanujanDecoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True  # the MoE eager dispatch switches to a shape-static path when compiled
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": RamanujanRouter,
        "hidden_states": RamanujanDecoderLayer,
        "attentions": RamanujanAttention,
    }
    # Checkpoints saved before the routers had a balancing bias load quietly with a zero bias: what they routed by.
    _keys_to_ignore_on_load_missing = [r"\.mlp\.e_score_correction_bias$"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also name every head we ship in config.json's `auto_map`.

        Transformers writes only the saving class there, so a checkpoint saved from the causal LM could not be loaded
        through `trust_remote_code` as a classifier or a base model (the package registers these Auto classes).
        """
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **remote_code_auto_map()}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Unless asked otherwise, experts run our "eager" forward rather than Transformers' "grouped_mm" everywhere.

        That default is chosen per device at each call (`RamanujanExperts`), since a model is built before it is
        placed: on CPU our sorted dispatch, which was as fast from 4 to 32 experts and faster at 64 (docs/benchmarks.md,
        "Scaling", has the numbers); on an accelerator Transformers' "grouped_mm", Qwen3-MoE's default there (upstream's
        choice, unmeasured here: no GPU). Any other `experts_implementation` ("grouped_mm", "batched_mm") runs as named
        on every device.
        """
        return super().get_correct_experts_implementation(requested_experts or "eager")

    def update_router_biases(self) -> None:
        """One auxiliary-loss-free balancing step of every MoE layer (see `update_router_biases`): call it once per
        optimizer step when `config.router_bias_update_rate` > 0 (`acx-rt train` and `acx-rt finetune` do)."""
        update_router_biases(self)

    def post_init(self):
        # The routers' balancing bias moves by γ ~ 1e-3 per step, steps bf16's 8-bit mantissa would lose: it stays in
        # float32 when a checkpoint is loaded in half precision (as DeepSeek-V3's). Set per model, since the list may
        # only name modules the model has, and dense models have none.
        self._keep_in_fp32_modules_strict = ["e_score_correction_bias"] if self.config.is_moe else None
        self.weight_roles = weight_roles(self)  # before super().post_init(), which initializes the weights
        super().post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """Draw every weight by the rule of `config.init_scheme` for its role (`weight_roles`); the rules, one row per
        weight and one column per scheme, are the table in `initialization_ramanujan.weight_std`.

        `config.zero_init_output_projections` starts every output projection at zero instead, whatever the scheme.
        Transformers calls this on each module that owns parameters (remote code is initialized leaf by leaf), and
        `transformers.initialization` skips tensors that `from_pretrained` loaded. The Ramanujan scheme draws from a
        normal truncated at ±2σ (as the seed does), the baselines plain normals; each weight the way its own scheme
        draws (`scheme_for_role`: the ablation switches can give the embedding or head another scheme).
        """
        config = self.config

        def fill(tensor: torch.Tensor, role: str, fan_in: int, fan_out: int, layer_idx: int | None = None):
            if role == "output_projection" and config.zero_init_output_projections:
                init.zeros_(tensor)  # each branch starts adding nothing to the residual stream
                return
            std = weight_std(config, role, fan_in, fan_out, layer_idx)
            if scheme_for_role(config, role) == "ramanujan":
                init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)
            else:
                init.normal_(tensor, mean=0.0, std=std)

        # A linear outside the decoder layers is an output head (lm_head, the classifier's score): so is one that
        # resize_token_embeddings has just made.
        role, layer = self.weight_roles.get(module, ("lm_head", None))
        if isinstance(module, RamanujanExperts):
            fill(module.gate_up_proj, "gate_projection", module.hidden_dim, module.intermediate_dim, layer)
            # The up half, where its rule differs from the gate's (depth_scaled, deepnorm): the same draw rescaled,
            # which keeps the random stream, and every other scheme's weights, as they were.
            up_std = weight_std(config, "up_projection", module.hidden_dim, module.intermediate_dim, layer)
            gate_std = weight_std(config, "gate_projection", module.hidden_dim, module.intermediate_dim, layer)
            if up_std != gate_std and not getattr(module.gate_up_proj, "_is_hf_initialized", False):
                module.gate_up_proj[:, module.intermediate_dim :].mul_(up_std / gate_std)
            fill(module.down_proj, "output_projection", module.intermediate_dim, module.hidden_dim, layer)
        elif isinstance(module, nn.Linear):
            if module is self.get_output_embeddings() and config.tie_word_embeddings:
                return  # the head is the embedding matrix, initialized as such
            fill(module.weight, role, module.in_features, module.out_features, layer)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            fill(module.weight, "embedding", module.embedding_dim, module.num_embeddings)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, RamanujanRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RamanujanSparseMoeBlock):
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, RamanujanRotaryEmbedding):
            inv_freq, _ = module.compute_inv_freq(module.config, module.inv_freq.device)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


# Decoder linears whose role is not "linear", by the end of their name (the output projections: OUTPUT_PROJECTIONS).
PROJECTION_ROLES = {"v_proj": "value_projection", "gate_proj": "gate_projection", "up_proj": "up_projection",
                    **{name: "output_projection" for name in OUTPUT_PROJECTIONS}}


def weight_roles(model: nn.Module) -> dict[nn.Module, tuple[str, int]]:
    """(role for `weight_std`, decoder layer) of each weight-holding module of the decoder layers, read from its name
    the way nanoGPT finds its `c_proj`: the router; v_proj, gate_proj and up_proj; the output projections (`o_proj`,
    `down_proj`), which write into the residual stream; q_proj and k_proj ("linear"). The fused experts are tagged
    by their module ("linear"): `_init_weights` draws their two tensors by role."""
    roles = {}
    for layer in (module for module in model.modules() if isinstance(module, RamanujanDecoderLayer)):
        for name, module in layer.named_modules():
            if isinstance(module, RamanujanRouter):
                roles[module] = ("router", layer.layer_idx)
            elif isinstance(module, (nn.Linear, RamanujanExperts)):
                role = next((role for end, role in PROJECTION_ROLES.items() if name.endswith(end)), "linear")
                roles[module] = (role, layer.layer_idx)
    return roles


def check_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    vocab_size: int,
) -> None:
    """Bad Python-API input fails here, with one ValueError naming the problem, before any work.

    Without these checks an empty batch, float ids or an out-of-range id fail deep inside as an IndexError or
    RuntimeError (a device-side assert on CUDA), and an attention_mask of the wrong shape is silently broadcast
    or cut, which changes the logits. Only the id range needs the ids' values; the rest reads shapes and dtypes.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    name, tokens, axes = (
        ("input_ids", input_ids, "(batch, sequence)")
        if input_ids is not None
        else ("inputs_embeds", inputs_embeds, "(batch, sequence, hidden)")
    )
    if tokens.ndim != axes.count(",") + 1:
        raise ValueError(f"{name} must have the axes {axes}, got shape {tuple(tokens.shape)}")
    if input_ids is not None and not holds_integers(input_ids):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    batch, length = tokens.shape[:2]
    if batch == 0 or length == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tokens.shape)}): give at least one sequence of one token")
    if attention_mask is not None and attention_mask.ndim == 2:  # a 4-D mask is taken as prepared by the caller
        cached = cache.get_seq_length() if cache is not None else 0
        # A static cache reports its length as a tensor: comparing it would read it back, so only its batch is checked.
        expected = (batch, cached + length) if isinstance(cached, int) else (batch, attention_mask.shape[1])
        if tuple(attention_mask.shape) != expected:
            after_cache = f" after {cached} cached tokens" if cached else ""
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but {name} has shape {tuple(tokens.shape)}"
                f"{after_cache}: the mask must be (batch, cached + new tokens) = {expected}"
            )
    if input_ids is not None:
        check_ids_in_range(input_ids, vocab_size, "token id", cache)


def holds_integers(tensor: torch.Tensor) -> bool:
    """Whether a tensor can hold token ids: any integer dtype (not float, complex or bool)."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def check_ids_in_range(
    ids: torch.Tensor, vocab_size: int, what: str, cache: Cache | None, ignore_index: int | None = None
) -> None:
    """Fail with the offending id (a token id or a label) instead of an opaque index error or device-side assert.

    The check reads the ids' min and max back to the host: free for CPU tensors, but a device→host sync on an
    accelerator, which would stall every decode step of `generate()`. So on an accelerator only passes that do not
    extend a filled cache check (training steps, a prompt's prefill, one forward): a decode step feeds back ids that
    `generate()` picked from this model's own head, which has the embedding's size (`resize_token_embeddings` resizes
    both). A cache filled before the first call (a static cache that `generate()` initialized early) also skips it.
    So does any cache that is not a `Cache`: continuous batching (`generate_batch`, `transformers serve`) hands the
    forward its `PagedAttentionCache`, every step of which mixes new prompt chunks with decode tokens of many
    requests and runs asynchronously or inside a CUDA graph. Graphs being traced or captured skip it too (a host
    read would break them). `vocab_size` is the live embedding/head size, so it follows `resize_token_embeddings`.
    """
    if is_tracing(ids) or ids.numel() == 0:
        return
    if on_accelerator(ids) and cache is not None and (not isinstance(cache, Cache) or cache.is_initialized):
        return
    if ignore_index is not None:
        ids = ids.masked_fill(ids == ignore_index, 0)
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # one read for both
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        ignored = f", or {ignore_index} to ignore" if ignore_index is not None else ""
        raise ValueError(
            f"{what} {bad} is outside the vocabulary (vocab_size={vocab_size}, valid ids 0..{vocab_size - 1}{ignored})"
        )


class RamanujanModel(RamanujanPreTrainedModel):
    """The decoder stack without a head: embeddings → layers → final norm."""

    def __init__(self, config: RamanujanConfig):
        super().__init__(config)
        config.check_special_token_ids()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [RamanujanDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = RamanujanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RamanujanRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @accepts_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        check_inputs(input_ids, inputs_embeds, attention_mask, cache, self.embed_tokens.num_embeddings)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_NAME: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                **{CACHE_NAME: cache},
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: cache})


def chosen_experts(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The expert ids each token was routed to: top k of softmax(logits) + bias, as
    `RamanujanSparseMoeBlock.select` chooses. Without a bias, the top k of the logits (the same choice: softmax
    keeps the order)."""
    if bias is None:
        return torch.topk(logits, top_k, dim=-1).indices
    return torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32) + bias.to(logits.device), top_k, dim=-1).indices


def routing_choices(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(router probabilities, top-k assignments as a 0/1 count per expert) of each token of one MoE layer: the
    choice the model made (chosen by probabilities + balancing bias, as `RamanujanSparseMoeBlock.select` does)."""
    probs = F.softmax(logits.float(), dim=-1)
    scores = probs if bias is None else probs + bias.to(probs.device)
    return probs, F.one_hot(torch.topk(scores, top_k, dim=-1).indices, logits.shape[-1]).sum(dim=1).float()


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    biases: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """The output's `aux_loss`: the Switch-Transformer balance loss (Fedus et al. 2022, eqs. 4–6) in the top-k form of
    Mixtral's `load_balancing_loss_func`, which Qwen3-MoE uses too: E · Σ_e f_e · P_e, the same value, so that
    clients that weight `aux_loss` by `router_aux_loss_coef` (TRL's DPO and GRPO trainers) balance as with Mixtral.

    f_e is the number of top-k assignments to expert e per token and P_e the mean router probability of e, both pooled
    over the tokens of every MoE layer (as Mixtral pools them, not a mean of per-layer losses). Σ_e f_e = k, so the loss
    is k when assignments and probabilities are even (2.0 at top-2) and at most E. Padding (mask 0) is left out; an
    all-padding batch gives 0 (Mixtral's would be 0/0). `biases` (`router_biases(model)`, one per layer) are the
    routers' balancing biases: f_e counts the choice they made (the real assignment), P_e stays the unbiased
    probability, through which the gradient flows; with zero biases this is Mixtral's function.
    """
    device = router_logits[0].device  # where Mixtral sums too: the layers may sit on different devices
    num_experts = router_logits[0].shape[-1]
    weights = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    assignments = torch.zeros(num_experts, device=device)
    probabilities = torch.zeros(num_experts, device=device)
    tokens = torch.zeros((), device=device)
    for layer, logits in enumerate(router_logits):
        probs, chosen = routing_choices(logits.to(device), top_k, None if biases is None else biases[layer])
        layer_weights = torch.ones(probs.shape[0], device=device) if weights is None else weights
        assignments = assignments + (chosen * layer_weights[:, None]).sum(0)
        probabilities = probabilities + (probs * layer_weights[:, None]).sum(0)
        tokens = tokens + layer_weights.sum()
    tokens = tokens.clamp_min(1)
    return num_experts * ((assignments / tokens) * (probabilities / tokens)).sum()


def switch_balance_loss(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    biases: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """The balance term our training loss adds (× router_aux_loss_coef): the same Switch loss per MoE layer, E · Σ_e
    f_e · P_e with f_e the share of that layer's N·k top-k assignments going to expert e, averaged over layers. So
    it is 1.0 at perfect balance for any k, and every layer is pushed to balance its own experts.

    It is the term every MoE result in docs/ was trained with. Mixtral's pooled form (`load_balancing_loss`) in its
    place trained worse at the quality anchor (docs/benchmarks.md, "Time to target"): pooled over layers, one
    layer's overloaded expert can be offset by another layer's idle one. Padding (mask 0) is left out; `biases` as in
    `load_balancing_loss`. Its arithmetic is the first release's, so earlier runs reproduce exactly.
    """
    losses = []
    for layer, logits in enumerate(router_logits):
        probs, chosen = routing_choices(logits, top_k, None if biases is None else biases[layer])
        weights = torch.ones(probs.shape[0], device=probs.device) if attention_mask is None else attention_mask.reshape(-1).float()
        weights = weights / weights.sum().clamp_min(1)  # an all-padding batch: weight 0, not 0/0
        assignment_share = (chosen * weights[:, None]).sum(0) / top_k
        mean_prob = (probs * weights[:, None]).sum(0)
        losses.append(logits.shape[-1] * (assignment_share * mean_prob).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)², averaged over layers."""
    losses = []
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1) ** 2
        if attention_mask is None:
            losses.append(z.mean())
        else:
            mask = attention_mask.reshape(-1).float()
            losses.append((z * mask).sum() / mask.sum().clamp_min(1))
    return torch.stack(losses).mean()


def expert_load(
    router_logits: tuple[torch.Tensor, ...], top_k: int, biases: tuple[torch.Tensor, ...] | None = None
) -> torch.Tensor:
    """Share of top-k assignments per expert, one row per MoE layer: (num_moe_layers, num_experts), rows sum to 1.

    Pass the routers' balancing biases (`router_biases(model)`) to count the choice the model really made."""
    rows = []
    for layer, logits in enumerate(router_logits):
        chosen = chosen_experts(logits, top_k, None if biases is None else biases[layer]).reshape(-1)
        rows.append(torch.bincount(chosen, minlength=logits.shape[-1]).float() / chosen.numel())
    return torch.stack(rows)


@dataclass
class RamanujanCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """Qwen3-MoE's / Mixtral's output (whose cache field has the installed release's name) plus the router z-loss.

    As there, `aux_loss` is the raw load-balancing loss (Mixtral's value, `load_balancing_loss`); `z_loss` is the raw
    router z-loss; with labels, `loss` = LM loss + router_aux_loss_coef · `switch_balance_loss` (the per-layer form,
    1.0 at balance) + router_z_loss_coef · z_loss.
    """

    z_loss: torch.FloatTensor | None = None


def check_labels(labels: torch.Tensor, tokens: torch.Tensor, vocab_size: int, cache: Cache | None) -> None:
    """Labels: integer ids shaped like the input, each a vocabulary id or -100 (ignored); one ValueError if not."""
    if not holds_integers(labels):
        raise ValueError(f"labels must hold integer token ids (or -100), got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(tokens.shape[:2]):
        expected = tuple(tokens.shape[:2])
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the input has (batch, sequence) = {expected}")
    check_ids_in_range(labels, vocab_size, "label", cache, ignore_index=-100)


class RamanujanForCausalLM(RamanujanPreTrainedModel, GenerationMixin):
    """Decoder + LM head. With MoE and labels, the router's balance and z losses join `loss`, times their coefs."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: RamanujanConfig):
        super().__init__(config)
        self.model = RamanujanModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @accepts_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> RamanujanCausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.is_moe and self.config.output_router_logits
        need_router_logits = self.config.is_moe and (output_router_logits or labels is not None)
        tokens = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and tokens is not None:  # no input at all: the base model names that
            check_labels(labels, tokens, self.lm_head.out_features, cache)
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=need_router_logits,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        aux_loss = z_loss = None
        if need_router_logits:
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_experts_per_tok, attention_mask,
                                           router_biases(self))
            z_loss = router_z_loss(outputs.router_logits, attention_mask)
            if loss is not None:
                balance = switch_balance_loss(outputs.router_logits, self.config.num_experts_per_tok, attention_mask,
                                              router_biases(self))
                # Summed in this order since the first release, so the total (and the published numbers) stay exact.
                router_loss = self.config.router_aux_loss_coef * balance + self.config.router_z_loss_coef * z_loss
                loss = loss + router_loss.to(loss.device)
        return RamanujanCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
        )


# `generate()` calls `inspect.signature(model.forward)` on every token for models registered for remote code, as ours
# are (a backward-compatibility check for `cache_position` in `prepare_inputs_for_generation`, Transformers 5.x).
# Python returns a function's `__signature__` when it has one, so storing it makes that check a lookup
# (the per-token saving is in docs/benchmarks.md, Speed).
RamanujanForCausalLM.forward.__signature__ = inspect.signature(RamanujanForCausalLM.forward)


# Not Transformers' `GenericForSequenceClassification`: its __init__ builds the decoder with `AutoModel.from_config`,
# which under remote code has no `trust_remote_code` to pass and raises (checked on 5.23.0 and 5.24.0).
class RamanujanForSequenceClassification(RamanujanPreTrainedModel):
    """Decoder + linear score head on the last non-pad token (Llama's pooling; works with left or right padding)."""

    def __init__(self, config: RamanujanConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = RamanujanModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @accepts_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs: MoeModelOutputWithPast = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = logits.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot classify a batch of more than one sequence without a pad_token_id in the config.")
        if pad_token_id is None or input_ids is None:
            last_non_pad_token = -1
        else:
            non_pad = (input_ids != pad_token_id).to(logits.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last_non_pad_token = (positions * non_pad).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_non_pad_token]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def remote_code_auto_map() -> dict[str, str]:
    """`auto_map` entries of the model heads, as "modeling_ramanujan.ClassName" (the file save_pretrained copies)."""
    heads = {
        "AutoModel": RamanujanModel,
        "AutoModelForCausalLM": RamanujanForCausalLM,
        "AutoModelForSequenceClassification": RamanujanForSequenceClassification,
    }
    return {auto: f"{head.__module__.rsplit('.', 1)[-1]}.{head.__name__}" for auto, head in heads.items()}


__all__ = [
    "RamanujanPreTrainedModel",
    "RamanujanModel",
    "RamanujanForCausalLM",
    "RamanujanForSequenceClassification",
    "RamanujanCausalLMOutputWithPast",
    "load_balancing_loss",
    "switch_balance_loss",
    "router_z_loss",
    "expert_load",
    "router_biases",
    "update_router_biases",
]
