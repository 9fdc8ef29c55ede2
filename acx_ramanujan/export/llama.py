"""`acx-rt export --format llama`: a Ramanujan checkpoint as a standard Transformers checkpoint (no remote code).

Dense models become `LlamaForCausalLM`; MoE models `MixtralForCausalLM` or, with shared experts or leading dense
layers, `Ernie4_5_MoeForCausalLM`; models with `qk_norm` become `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM`. The
architectures are the same up to one thing: our attention scale per layer l is 1/(√head_dim·(1 + α·e^(−λ·l))) (the
seed's temperature), theirs is 1/√head_dim. The factor 1/(1 + α·e^(−λ·l)) is folded into that layer's `q_proj` rows:
RoPE rotates q after `q_proj`, a rotation commutes with a scalar, so q·k comes out scaled exactly as ours. With
`qk_norm` q is normalized after `q_proj`, which would undo a factor there; it goes into `q_norm`'s weight instead,
which multiplies the normalized q before RoPE. The depth schemes fold the same way: a depth parametrization's constant
branch multiplier m into every branch's last linear map (`o_proj`, `down_proj`, the experts' and shared experts'
`down_proj`: m·W·x = (m·W)·x), LayerNorm Scaling's 1/√(l+1) into both norm weights of layer l
(w ⊙ n(x)·s = (s·w) ⊙ n(x)). DeepNorm's post-norm layers are another architecture: refused.

What maps where (anything else is refused, naming the field):

- dense (num_experts = 0): Llama, with any head (tied or not), GQA, head_dim and rope type (both models compute
  RoPE from the same `rope_parameters` through Transformers' registry).
- `qk_norm=True`: Qwen3 (dense) or Qwen3-MoE, whose attention is ours with `q_norm` / `k_norm` (RMSNorm over head_dim
  on each head before RoPE) and whose router is ours (softmax, top-k, renormalized when `norm_topk_prob`, either
  value); our `first_k_dense_layers` are its `mlp_only_layers` (width `intermediate_size`). Refused: shared experts
  and a nonzero balancing bias, which Qwen3-MoE does not have.
- MoE with `norm_topk_prob=True` (softmax over the router logits, top-k, renormalized):
  - without shared experts, leading dense layers and a nonzero balancing bias: Mixtral, the same routing.
  - otherwise (or when the routers' balancing bias is nonzero): ERNIE 4.5 MoE, whose shared experts are ours (one
    ungated SwiGLU of moe_intermediate_size × count, added) and whose `moe_layer_start_index` is our
    `first_k_dense_layers`. It routes as we do: its `e_score_correction_bias` is added to the softmax probabilities
    to choose the top k only, as ours is; and it rotates adjacent pairs (2i, 2i+1) where Llama rotates (i, i + d/2), so
    each head's q and k rows are reordered to match: the same dot products, exactly.
- MoE with `norm_topk_prob=False` and no `qk_norm`: refused. Transformers 5.24's classes that can skip the
  renormalization (Qwen3-MoE, OLMoE) normalize q and k with RMSNorms; Qwen2-MoE gates its shared expert with a sigmoid;
  DeepSeek-V3 uses latent attention and sigmoid routing.

The tokenizer goes as a `tokenizer.json` that `PreTrainedTokenizerFast` loads: the checkpoint's own (a BPE from
`acx-rt tokenizer train`), or, for the byte tokenizer, the same 256 bytes + 3 specials as a merge-free byte-level
BPE built with `tokenizers`.
"""

from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Ernie4_5_MoeConfig,
    Ernie4_5_MoeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from ..training.bpe import SPECIAL_TOKENS, _renumbered_like_byte_tokenizer
from ..configuration_ramanujan import RamanujanConfig
from ..commands import InputError
from . import ExportError, random_batch
from ..initialization_ramanujan import attention_scaling
from ..modeling_ramanujan import RamanujanDecoderLayer, RamanujanForCausalLM, router_biases
from ..files import read_json_object
from ..tokenization_ramanujan import DEFAULT_CHAT_TEMPLATE, RamanujanByteTokenizer

# Fields every exported config carries over unchanged (the names are Llama's, Mixtral's, ERNIE's and Qwen3's too).
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "rope_parameters", "rms_norm_eps", "tie_word_embeddings",
    "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id", "use_cache",
)
# The loaded-back model must give the same logits; measured: below 1e-7 on the tests' tiny models.
MAX_ABS_DIFF = 1e-4
VERIFY_BATCH, VERIFY_LENGTH = 3, 17
GENERATE_TOKENS = 5


class UnrepresentableError(ValueError):
    """The checkpoint has a feature no in-library Transformers class represents exactly."""


def target_config(
    config: RamanujanConfig, router_bias: bool = False
) -> LlamaConfig | MixtralConfig | Ernie4_5_MoeConfig | Qwen3Config | Qwen3MoeConfig:
    """The Llama / Mixtral / ERNIE 4.5 MoE / Qwen3 / Qwen3-MoE config of the same shapes; UnrepresentableError names
    what cannot map.

    `router_bias`: the routers' balancing biases are nonzero, which Mixtral and Qwen3-MoE cannot represent (ERNIE can)."""
    if config.deepnorm:
        raise UnrepresentableError(
            "deepnorm=True (post-norm layers, x ← norm(α·x + f(x))) has no Llama, Mixtral, ERNIE or Qwen3 equivalent: "
            "they are pre-norm"
        )
    shared = {name: getattr(config, name) for name in SHARED_FIELDS}
    if config.qk_norm:
        return qwen3_config(config, shared, router_bias)
    if not config.is_moe:
        return LlamaConfig(**shared, intermediate_size=config.intermediate_size, attention_bias=False, mlp_bias=False)
    if not config.norm_topk_prob:
        raise UnrepresentableError(
            "norm_topk_prob=False has no exact in-library equivalent: Mixtral and ERNIE 4.5 MoE always renormalize the "
            "top-k weights, and the classes that need not (Qwen3-MoE, OLMoE) normalize q and k with RMSNorms "
            "(with qk_norm=True, Qwen3-MoE represents it)"
        )
    if config.num_shared_experts == 0 and config.first_k_dense_layers == 0 and not router_bias:
        return MixtralConfig(
            **shared,
            intermediate_size=config.moe_intermediate_size,
            num_local_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            sliding_window=None,
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    return Ernie4_5_MoeConfig(
        **shared,
        intermediate_size=config.intermediate_size,
        use_bias=False,
        moe_intermediate_size=config.moe_intermediate_size,
        moe_k=config.num_experts_per_tok,
        moe_num_experts=config.num_experts,
        moe_num_shared_experts=config.num_shared_experts,
        moe_layer_start_index=config.first_k_dense_layers,
        moe_layer_end_index=config.num_hidden_layers - 1,
        moe_layer_interval=1,
        output_router_logits=False,
    )


def qwen3_config(config: RamanujanConfig, shared: dict, router_bias: bool) -> Qwen3Config | Qwen3MoeConfig:
    """Qwen3 (dense) or Qwen3-MoE for a qk_norm model: full attention in every layer (no sliding window), no biases."""
    attention = dict(attention_bias=False, use_sliding_window=False)
    if not config.is_moe:
        return Qwen3Config(**shared, **attention, intermediate_size=config.intermediate_size)
    if config.num_shared_experts:
        raise UnrepresentableError(
            f"qk_norm=True with num_shared_experts={config.num_shared_experts}: Qwen3-MoE, the in-library class with "
            "per-head q/k norms, has no shared experts"
        )
    if router_bias:
        raise UnrepresentableError(
            "qk_norm=True with a nonzero router balancing bias (router_bias_update_rate > 0 moved it): Qwen3-MoE "
            "chooses experts by the router probabilities alone"
        )
    return Qwen3MoeConfig(
        **shared,
        **attention,
        intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.moe_intermediate_size,
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        norm_topk_prob=config.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=list(range(config.first_k_dense_layers)),
        output_router_logits=False,
    )


def pairs_adjacent(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (i, i + d/2) rotary pairs to (2i, 2i + 1) (ERNIE's and llama.cpp's layout)."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def query_factors(config: RamanujanConfig) -> list[float]:
    """Per layer, our attention scale divided by the standard 1/√head_dim: what q_proj's rows (q_norm's weight with
    qk_norm) are multiplied by."""
    standard = config.head_dim**-0.5
    return [
        attention_scaling(config.head_dim, layer, config.attention_scale_alpha, config.attention_scale_decay) / standard
        for layer in range(config.num_hidden_layers)
    ]


def converted_state_dict(model: RamanujanForCausalLM, target) -> dict[str, torch.Tensor]:
    """Our weights under the `target` config's names, q_proj (q_norm with qk_norm) scaled by `query_factors`, the branch
    multiplier and LayerNorm Scaling folded in (`folded_factors`).

    Our names are Llama's (and Qwen3's) already; only the MoE router is Mixtral's, ERNIE's and Qwen3-MoE's `mlp.gate`
    (the fused expert weights share their layout: gate_up_proj (E, 2·I, H) with gate first, down_proj (E, H, I)). For ERNIE, q and k rows are
    reordered to its rotary layout and our routers' balancing bias becomes its score-correction bias (Mixtral has
    none: `target_config` picks it only when the bias is zero).
    """
    config = model.config
    ernie = isinstance(target, Ernie4_5_MoeConfig)
    state = {name.replace(".mlp.router.", ".mlp.gate."): tensor for name, tensor in model.state_dict().items()
             if not name.endswith(".mlp.e_score_correction_bias")}
    for name, factor in folded_factors(model).items():
        state[name] = state[name] * factor
    scaled = "q_norm.weight" if config.qk_norm else "q_proj.weight"
    for layer, factor in enumerate(query_factors(config)):
        attention = f"model.layers.{layer}.self_attn."
        state[attention + scaled] = state[attention + scaled] * factor
        if ernie:
            for name, heads in (("q_proj.weight", config.num_attention_heads), ("k_proj.weight", config.num_key_value_heads)):
                state[attention + name] = pairs_adjacent(state[attention + name], heads)
            if config.is_moe_layer(layer):
                bias = model.model.layers[layer].mlp.e_score_correction_bias.float().reshape(1, -1)
                state[f"model.layers.{layer}.mlp.gate.moe_statics.e_score_correction_bias"] = bias
    return state


def folded_factors(model: RamanujanForCausalLM) -> dict[str, float]:
    """Weight name → the constant our forward multiplies its output by and a plain Llama does not: each layer's branch
    multiplier on the branches' last maps, its pre-norms' output scale (LayerNorm Scaling) on their weights."""
    factors = {}
    for name, module in model.named_modules():
        if not isinstance(module, RamanujanDecoderLayer):
            continue
        if module.branch_multiplier is not None:
            for weight, _ in module.named_parameters():
                if weight.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                    factors[f"{name}.{weight}"] = module.branch_multiplier
        if module.norm_scale is not None:
            for norm in ("input_layernorm", "post_attention_layernorm"):
                factors[f"{name}.{norm}.weight"] = module.norm_scale
    return factors


def to_transformers_model(model: RamanujanForCausalLM) -> PreTrainedModel:
    """The Transformers model `target_config` picks (Llama, Mixtral, ERNIE 4.5 MoE, Qwen3, Qwen3-MoE) holding our
    weights (same dtype), in eval mode."""
    config = target_config(model.config, router_bias=any(bias.any().item() for bias in router_biases(model)))
    target_class = {
        LlamaConfig: LlamaForCausalLM,
        MixtralConfig: MixtralForCausalLM,
        Ernie4_5_MoeConfig: Ernie4_5_MoeForCausalLM,
        Qwen3Config: Qwen3ForCausalLM,
        Qwen3MoeConfig: Qwen3MoeForCausalLM,
    }[type(config)]
    with torch.device("meta"):
        target = target_class(config)
    target.load_state_dict(converted_state_dict(model, config), strict=True, assign=True)
    target.tie_weights()
    target.config.architectures = [target_class.__name__]
    target.generation_config = model.generation_config
    # Non-persistent buffers (the rotary inv_freq) were built on the meta device: rebuild them from the config.
    target.model.rotary_emb = type(target.model.rotary_emb)(config=config)
    return target.eval()


def byte_tokenizer_fast() -> PreTrainedTokenizerFast:
    """RamanujanByteTokenizer's ids as a plain fast tokenizer: a byte-level BPE without merges (byte b → id b,
    then <pad>, <s>, </s>), <s> prepended. Unlike ours it parses special-token text typed in the input into the
    special ids (`split_special_tokens=False`), as Llama tokenizers and our trained BPE do."""
    empty = Tokenizer(models.BPE())
    empty.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=_renumbered_like_byte_tokenizer(empty), chat_template=DEFAULT_CHAT_TEMPLATE, **SPECIAL_TOKENS
    )


def fast_tokenizer(checkpoint: Path) -> PreTrainedTokenizerFast | None:
    """The checkpoint's own fast tokenizer (tokenizer.json), the byte tokenizer rebuilt as one, or None (no tokenizer,
    or one of another kind: it is not guessed at)."""
    if (checkpoint / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(checkpoint)
    config_file = checkpoint / "tokenizer_config.json"
    if config_file.is_file() and read_json_object(config_file).get("tokenizer_class") == RamanujanByteTokenizer.__name__:
        return byte_tokenizer_fast()
    return None


def model_card(config, alpha: float, folded_into: str, folded: bool) -> ModelCard:
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=["acx-ramanujan", config.model_type])
    body = (
        f"# {config.architectures[0]} exported from an acx-ramanujan-transformer checkpoint\n\n"
        f"A standard `{config.architectures[0]}` checkpoint: load it with `AutoModelForCausalLM.from_pretrained(path)`,"
        " no `trust_remote_code`. It was written by `acx-rt export --format llama`, which checked that its logits"
        " equal the original model's.\n\n"
        f"The original's per-layer attention temperature (α = {alpha}) is folded into each layer's `{folded_into}`"
        f" weights, so these weights differ from the original's `{folded_into}` by that per-layer factor.\n"
        + ("\nThe original's depth scheme (a constant residual-branch multiplier, or LayerNorm Scaling's per-layer"
           " factor on the pre-norms) is folded the same way into `o_proj` and the `down_proj` weights, or into the"
           " norm weights.\n" if folded else "")
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def max_logit_difference(reference: torch.nn.Module, target: torch.nn.Module) -> float:
    """Max |target − reference| logit over the attended positions of a left-padded random batch."""
    input_ids, attention_mask = random_batch(reference.config, VERIFY_BATCH, VERIFY_LENGTH, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        actual = target(input_ids=input_ids, attention_mask=attention_mask).logits
    return (actual - expected)[attention_mask.bool()].abs().max().item()


def greedy_tokens(reference: torch.nn.Module, target: torch.nn.Module) -> tuple[list[list[int]], list[list[int]]]:
    """`generate()` greedy tokens of a left-padded batch: (ours without a cache, the exported model with its cache)."""
    input_ids, attention_mask = random_batch(reference.config, 2, 6, torch.Generator().manual_seed(2))
    settings = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=GENERATE_TOKENS, do_sample=False)
    with torch.no_grad():
        expected = reference.generate(**settings, use_cache=False)[:, input_ids.shape[1] :]
        actual = target.generate(**settings)[:, input_ids.shape[1] :]
    return expected.tolist(), actual.tolist()


def export(model: RamanujanForCausalLM, checkpoint: Path, args, directory: Path) -> tuple[list[str], list[str]]:
    """Write the Transformers checkpoint (config, safetensors, generation config, tokenizer, README.md), load it
    back with Transformers' class and compare: (written files, report lines)."""
    try:
        target = to_transformers_model(model)
    except UnrepresentableError as error:
        raise InputError(f"--format llama: {error}") from None
    target.save_pretrained(directory)
    tokenizer = fast_tokenizer(checkpoint)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    folded_into = "q_norm" if model.config.qk_norm else "q_proj"
    model_card(target.config, model.config.attention_scale_alpha, folded_into, bool(folded_factors(model))).save(
        directory / "README.md"
    )

    architecture = target.config.architectures[0]
    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    difference = max_logit_difference(model, loaded)
    if not difference <= MAX_ABS_DIFF:
        raise ExportError(f"{architecture} logits differ from the model's by {difference:.2e} (> {MAX_ABS_DIFF:g})")
    expected, actual = greedy_tokens(model, loaded)
    if actual != expected:
        raise ExportError(f"{architecture} generated {actual} greedily, the model {expected}")
    lines = [
        f"{architecture} loaded back with Transformers: max |logit difference| {difference:.1e} "
        f"(batch {VERIFY_BATCH} x {VERIFY_LENGTH}, limit {MAX_ABS_DIFF:g}); greedy generate() gives the same tokens",
        "tokenizer: " + ("none written (the checkpoint has no tokenizer.json and no byte tokenizer)" if tokenizer is None
                         else "tokenizer.json (a fast tokenizer, no remote code)"),
    ]
    return sorted(path.name for path in directory.iterdir()), lines
