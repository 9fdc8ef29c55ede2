"""RamanujanConfig: Llama's fields, the MoE fields, and the initialization fields.

Field names and meanings follow `LlamaConfig` (and `Qwen3MoeConfig` for experts) so that anything written
for those configs reads ours. Bad values raise `ValueError` naming the field, at construction.
"""

import json
import math
import re
import types
import typing
from pathlib import Path

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .initialization_ramanujan import DEPTH_PARAMETRIZATIONS, DEPTH_SCALED_INITS, INIT_SCHEMES

PRESETS_DIR = Path(__file__).parent / "presets"

# The seed's attention temperature α, which `init_scheme="ramanujan"` brings along unless α is set explicitly.
SEED_ATTENTION_SCALE_ALPHA = 0.3

# The router's training settings: (type, default). They exist only on mixture-of-experts configs, as on Qwen3-MoE and
# Mixtral configs and unlike Llama's: clients such as TRL read `hasattr(config, "output_router_logits")` as "this
# model has a router" and then ask for router losses a dense model does not have. `router_bias_update_rate` is
# DeepSeek-V3's bias update speed γ for auxiliary-loss-free balancing (0: off; see `RamanujanRouter`).
MOE_LOSS_FIELDS = {"router_aux_loss_coef": (float, 0.01), "router_z_loss_coef": (float, 0.001),
                   "output_router_logits": (bool, False), "router_bias_update_rate": (float, 0.0)}

# Tensor-parallel rules by module path under the base model, grouped by the module that a config may or may not build.
# No rule for the routed experts: as in Qwen3-MoE since Transformers 5.25 (whose `moe_tp_experts` style is deprecated,
# going in 5.28), tensor parallelism replicates them and the expert-parallel plan (EP_PLAN) shards them.
TP_PLANS = {
    "attention": {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
                  "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"},
    "mlp": {"layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"},
    "shared_experts": {"layers.*.mlp.shared_experts.gate_proj": "colwise", "layers.*.mlp.shared_experts.up_proj": "colwise",
                       "layers.*.mlp.shared_experts.down_proj": "rowwise"},
    # Qwen3's rule: each rank normalizes its own heads with the whole (replicated) weight; gradients are summed.
    "qk_norm": {"layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
                "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce"},
}
EP_PLAN = {"layers.*.mlp.experts.gate_up_proj": "grouped_gemm", "layers.*.mlp.experts.down_proj": "grouped_gemm",
           "layers.*.mlp.experts": "ep_dispatch_experts"}

# The range of each float field, checked after it is known to be finite: (what the range is, test).
FLOAT_RANGES = {
    "rms_norm_eps": ("> 0", lambda value: value > 0),
    "ramanujan_gain": ("> 0", lambda value: value > 0),
    "initializer_range": ("> 0", lambda value: value > 0),
    "attention_scale_alpha": ("> -1 (the attention scale stays positive)", lambda value: value > -1),
    "attention_scale_decay": ("finite", lambda value: True),
    "attention_dropout": ("in [0, 1)", lambda value: 0 <= value < 1),
    "router_aux_loss_coef": (">= 0", lambda value: value >= 0),
    "router_z_loss_coef": (">= 0", lambda value: value >= 0),
    "router_bias_update_rate": (">= 0", lambda value: value >= 0),
}


class RamanujanConfig(PreTrainedConfig):
    r"""Configuration of a Ramanujan decoder (dense when `num_experts == 0`, mixture-of-experts otherwise).

    The default vocabulary is the byte tokenizer's: 256 byte ids, then pad (256), bos (257), eos (258).

    `qk_norm`: an RMSNorm over head_dim (weight per channel, eps `rms_norm_eps`) on every head of q and of k before
    RoPE, Qwen3's `q_norm` / `k_norm` (QK-norm: Dehghani et al. 2023); such a model exports as Qwen3 / Qwen3-MoE.

    Initialization: `init_scheme` picks the formula (see `initialization_ramanujan.weight_std`). The default is
    "normal" (GPT-2's rule) because it trained best in docs/init-study.md; "ramanujan" is the seed's scheme.
    `ramanujan_depth` / `ramanujan_transition` set R and T of the seed's schedule (None: derived from depth);
    `ramanujan_gain` multiplies every decoder weight's std. `attention_scale_alpha` / `attention_scale_decay`
    give layer l the attention scale 1 / (√head_dim · (1 + α·e^(−λ·l))); α = 0 is the standard scale, and
    α = None takes the scheme's own: the seed's 0.3 for "ramanujan", 0 for the baselines.
    Ablation switches, to take the Ramanujan scheme apart: `embedding_init_scheme` / `lm_head_init_scheme`
    draw the embedding / untied head with another scheme's rule (None: `init_scheme`'s), and
    `ramanujan_layer_schedule=False` drops the per-layer multiplier (σ = gain/√fan_in in every layer).

    Depth schemes (off by default; they compose with any `init_scheme` but the depth-scaled ones):
    `depth_parametrization` "completep" or "depth_mup" multiplies every attention and MLP/MoE branch by
    (L/L0)^-α (α = 1 or 1/2, L0 = `depth_base_layers`), draws output projections without depth scaling, and has
    `acx-rt train` scale the decoder layers' learning rate by (L/L0)^(α−1) and AdamW's ε by (L/L0)^-α
    (`initialization_ramanujan.residual_multiplier`, `hidden_optimizer_factors`). `layernorm_scaling` multiplies
    the output of layer l's two pre-norms by 1/√(l+1) (and also drops the depth scaling of the init).
    `deepnorm` makes every layer post-norm, x ← Norm(α·x + f(x)) with α = (2L)^(1/4) (DeepNet; pair it with
    `init_scheme="deepnorm"`); `input_layernorm` then normalizes the attention sum and `post_attention_layernorm`
    the MLP sum.
    """

    model_type = "ramanujan"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    default_theta = 10000.0
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 259
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 1024
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    qk_norm: bool = False
    pad_token_id: int | None = 256
    bos_token_id: int | None = 257
    eos_token_id: int | list[int] | None = 258
    use_cache: bool = True

    # Mixture of experts (num_experts == 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    num_shared_experts: int = 0
    first_k_dense_layers: int = 0
    norm_topk_prob: bool = True
    # router_aux_loss_coef (0.01), router_z_loss_coef (0.001), output_router_logits (False),
    # router_bias_update_rate (0.0): MoE only, see MOE_LOSS_FIELDS; set in __post_init__.

    # Initialization
    init_scheme: str = "normal"
    ramanujan_depth: int | None = None
    ramanujan_transition: int | None = None
    ramanujan_gain: float = 1.0
    initializer_range: float = 0.02
    attention_scale_alpha: float | None = None
    attention_scale_decay: float = 0.5
    # Ablation switches (docs/init-study.md): which scheme's rule draws the embedding / the untied head
    # (None: init_scheme's), and whether the Ramanujan scheme applies its per-layer schedule to linear weights.
    embedding_init_scheme: str | None = None
    lm_head_init_scheme: str | None = None
    ramanujan_layer_schedule: bool = True
    # Every output projection (o_proj, down_proj, the experts' and shared experts' down_proj) starts at zero, whatever
    # init_scheme draws for the rest (modded-nanoGPT's zero-initialized projections; docs/benchmarks.md, "Time to
    # target", has what it did at the quality anchor).
    zero_init_output_projections: bool = False

    # Depth schemes (docs/init-study.md; formulas and sources in initialization_ramanujan): a residual-branch
    # multiplier (L/depth_base_layers)^-α with its optimizer rules ("completep": α = 1, "depth_mup": α = 1/2),
    # LayerNorm Scaling of the pre-norms, and DeepNorm's post-norm residual.
    depth_parametrization: str | None = None
    depth_base_layers: int | None = None
    layernorm_scaling: bool = False
    deepnorm: bool = False

    def __post_init__(self, **kwargs):
        self._check_types()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.attention_scale_alpha is None:
            self.attention_scale_alpha = SEED_ATTENTION_SCALE_ALPHA if self.init_scheme == "ramanujan" else 0.0
        self._set_moe_loss_fields(kwargs)
        self._check_values()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        try:  # as LlamaConfig does; Transformers reports a missing rope key as KeyError
            self.validate_rope()
        except KeyError as error:
            raise ValueError(f"rope_parameters: {error.args[0]}") from None

    @classmethod
    def field_types(cls) -> dict[str, object]:
        """Every field this class adds, with its annotated type (the MoE loss fields included): what a preset,
        `--config_overrides` or a saved config.json may set."""
        types = {name: value for name, value in cls.__annotations__.items() if name in cls.__dataclass_fields__}
        return {**types, **{name: kind for name, (kind, _) in MOE_LOSS_FIELDS.items()}}

    def _check_types(self):
        """Each field against its annotation (int fields refuse bools and floats; float fields take ints), so a
        wrong type from JSON or the command line is a ValueError naming the field, not a TypeError later."""
        for name, annotation in type(self).field_types().items():
            if name in self.__dict__ and not _is_instance(getattr(self, name), annotation):
                raise ValueError(f"{name} must be {_type_name(annotation)}, got {getattr(self, name)!r}")

    def _set_moe_loss_fields(self, kwargs: dict):
        """Pop the router's training settings from `kwargs`: set on MoE configs, refused on dense ones unless default
        (configs saved before they became MoE-only carry the defaults)."""
        for name, (kind, default) in MOE_LOSS_FIELDS.items():
            value = kwargs.pop(name, default)
            if not _is_instance(value, kind):
                raise ValueError(f"{name} must be {_type_name(kind)}, got {value!r}")
            if self.is_moe:
                setattr(self, name, value)
            elif value != default:
                raise ValueError(f"{name} applies to mixture-of-experts models only (num_experts > 0), got {value!r}")

    def _check_values(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "moe_intermediate_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise ValueError(f"head_dim must be a positive even integer (rotary embeddings), got {self.head_dim!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or set head_dim explicitly"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        for name in ("num_experts", "num_shared_experts", "first_k_dense_layers", "ramanujan_depth",
                     "ramanujan_transition"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts "
                f"({self.num_experts})"
            )
        self._check_float_ranges()
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act {self.hidden_act!r} is unknown; valid: {', '.join(sorted(ACT2FN))}")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"init_scheme {self.init_scheme!r} is unknown; valid schemes: {', '.join(INIT_SCHEMES)}")
        for name in ("embedding_init_scheme", "lm_head_init_scheme"):
            value = getattr(self, name)
            if value is not None and value not in INIT_SCHEMES:
                raise ValueError(f"{name} {value!r} is unknown; valid: None or one of {', '.join(INIT_SCHEMES)}")
        self._check_depth_schemes()
        self._check_rope_parameters()

    def _check_depth_schemes(self):
        """The depth fields, and the combinations that have no meaning: a base depth without a parametrization,
        DeepNorm's post-norm with the pre-norm schemes, a depth-scaled init with the schemes that replace it."""
        parametrization, base = self.depth_parametrization, self.depth_base_layers
        if parametrization is not None and parametrization not in DEPTH_PARAMETRIZATIONS:
            raise ValueError(f"depth_parametrization {parametrization!r} is unknown; valid: None or one of "
                             f"{', '.join(DEPTH_PARAMETRIZATIONS)}")
        if parametrization is not None and base is None:
            raise ValueError(f"depth_parametrization={parametrization!r} needs depth_base_layers (L0: the depth at "
                             "which the branch multiplier is 1 and the learning rate is the recipe's)")
        if parametrization is None and base is not None:
            raise ValueError(f"depth_base_layers ({base}) applies only with a depth_parametrization")
        if base is not None and base <= 0:
            raise ValueError(f"depth_base_layers must be a positive integer, got {base}")
        replacing = [name for name, on in (("depth_parametrization", parametrization is not None),
                                           ("layernorm_scaling", self.layernorm_scaling)) if on]
        if self.deepnorm and replacing:
            raise ValueError(f"deepnorm=True (post-norm layers) does not combine with {replacing[0]}, a scheme "
                             "for pre-norm layers")
        if self.init_scheme in DEPTH_SCALED_INITS and replacing:
            raise ValueError(f"init_scheme {self.init_scheme!r} scales the init with depth, which {replacing[0]} "
                             "replaces; pick another init_scheme")

    def _check_float_ranges(self):
        """Every float field finite (NaN and inf are refused) and within its range."""
        for name, (meaning, within) in FLOAT_RANGES.items():
            if not hasattr(self, name):  # the router fields of a dense config
                continue
            value = float(getattr(self, name))
            if not (math.isfinite(value) and within(value)):
                raise ValueError(f"{name} must be {meaning}, got {value}")

    def _check_rope_parameters(self):
        if self.rope_parameters is None:
            return
        rope_type = self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default"))
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"rope_parameters: rope_type {rope_type!r} is unknown; valid: default, {', '.join(ROPE_INIT_FUNCTIONS)}"
            )
        theta = self.rope_parameters.get("rope_theta", self.default_theta)
        if not _is_instance(theta, float) or not math.isfinite(theta) or theta <= 0:
            raise ValueError(f"rope_parameters: rope_theta must be a finite number > 0, got {theta!r}")

    def check_special_token_ids(self):
        """Special token ids must be ids the embedding has (an out-of-range pad id fails deep inside nn.Embedding).

        Checked when a model is built, not when the config is: code that edits a config (Transformers' own tests
        shrink the vocabulary, then set the ids) may pass through a state where the defaults do not fit yet.
        """
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            for token_id in value if isinstance(value, list) else [value]:
                if token_id is not None and not 0 <= token_id < self.vocab_size:
                    raise ValueError(f"{name} {token_id} is outside the vocabulary (valid ids 0..{self.vocab_size - 1})")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The first `first_k_dense_layers` layers stay dense; the rest use experts when num_experts > 0."""
        return self.num_experts > 0 and layer_idx >= self.first_k_dense_layers

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel rules by module path under the base model: Llama's for attention and dense MLPs (shared
        experts are such MLPs), Qwen3's for the q/k norms, none for the routed experts (Qwen3-MoE's: see TP_PLANS); the embedding is split by
        vocabulary rows like the head tied to it ("colwise" on lm_head). Only rules for modules this config builds
        (Transformers' own tests require each to match one)."""
        plan = {"embed_tokens": "embedding_rowwise", **TP_PLANS["attention"]}
        if self.qk_norm:
            plan.update(TP_PLANS["qk_norm"])
        if not self.is_moe or self.first_k_dense_layers > 0:
            plan.update(TP_PLANS["mlp"])
        if self.is_moe and self.num_shared_experts > 0:
            plan.update(TP_PLANS["shared_experts"])
        return plan

    @property
    def base_model_ep_plan(self) -> dict[str, str] | None:
        """Expert-parallel rules (Qwen3-MoE's) for MoE configs; None for dense ones."""
        return dict(EP_PLAN) if self.is_moe else None

    @classmethod
    def parse_overrides(cls, text: str | None) -> dict:
        """`"k=v,k=v"` (e.g. `acx-rt train --config_overrides`) → {field: value}, each value parsed as its field's
        annotated type, so `hidden_size=wide` or an unknown field is refused by name."""
        if not text:
            return {}
        annotations = cls.field_types()
        overrides = {}
        # Split on commas that start a new `name=`, so JSON values such as rope_parameters may hold commas.
        for item in re.split(r",(?=\s*\w+\s*=)", text):
            name, sep, raw = (part.strip() for part in item.partition("="))
            if not sep or not name:
                raise ValueError(f"--config_overrides: {item!r} is not of the form key=value")
            if name not in annotations:
                raise ValueError(f"--config_overrides: unknown config field {name!r}")
            overrides[name] = _parse_typed(name, raw, annotations[name])
        return overrides

    @classmethod
    def from_preset(cls, name_or_path: str, **overrides) -> "RamanujanConfig":
        """A named preset from `presets/*.json` (e.g. "tiny", "tiny-moe") or a JSON file path, plus overrides."""
        path = Path(name_or_path)
        if not path.is_file():
            path = PRESETS_DIR / f"{name_or_path}.json"
        if not path.is_file():
            names = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
            raise ValueError(f"unknown preset {name_or_path!r}: not a JSON file, nor one of {', '.join(names)}")
        try:
            values = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"preset file {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"preset file {str(path)!r} must hold a JSON object of config fields")
        values.pop("model_type", None)
        unknown = sorted(set(overrides) - set(cls.field_types()))
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)} for RamanujanConfig")
        return cls(**{**values, **overrides})


def _parse_typed(name: str, raw: str, annotation) -> object:
    """The first member of `annotation` (e.g. `int | None`) that `raw` parses as."""
    kinds = [typing.get_origin(kind) or kind for kind in (typing.get_args(annotation) or (annotation,))]
    if raw.lower() in ("none", "null") and type(None) in kinds:
        return None
    for kind in kinds:
        if kind is bool and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        if kind in (int, float):
            try:
                return kind(raw)
            except ValueError:
                continue
        if kind in (dict, list):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(value, kind):
                return value
        if kind is str:
            return raw
    expected = " | ".join(getattr(kind, "__name__", str(kind)) for kind in kinds)
    raise ValueError(f"--config_overrides: {name}={raw!r} is not a valid {expected}")


def _is_instance(value: object, annotation) -> bool:
    """isinstance for the annotations used above (`int | None`, `int | list[int] | None`, `dict | None` ...),
    where an int is no bool and a float may be given as an int."""
    for kind in typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,):
        origin = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return True
        if origin is list and isinstance(value, list):
            if all(_is_instance(item, typing.get_args(kind)[0]) for item in value):
                return True
        elif origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        elif origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        elif origin in (bool, str, dict) and isinstance(value, origin):
            return True
    return False


def _type_name(annotation) -> str:
    return str(annotation).replace("<class '", "").replace("'>", "").replace("NoneType", "None")


__all__ = ["RamanujanConfig"]
