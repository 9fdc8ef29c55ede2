"""RamanujanConfig: Llama's fields, the MoE fields, and the initialization fields.

Field names and meanings follow `LlamaConfig` (and `Qwen3MoeConfig` for experts) so that anything written
for those configs reads ours. Bad values raise `ValueError` naming the field, at construction.
"""

import json
from pathlib import Path

from transformers import PreTrainedConfig

from .initialization_ramanujan import INIT_SCHEMES

PRESETS_DIR = Path(__file__).parent / "presets"

# The seed's attention temperature α, which `init_scheme="ramanujan"` brings along unless α is set explicitly.
SEED_ATTENTION_SCALE_ALPHA = 0.3


class RamanujanConfig(PreTrainedConfig):
    r"""Configuration of a Ramanujan decoder (dense when `num_experts == 0`, mixture-of-experts otherwise).

    The default vocabulary is the byte tokenizer's: 256 byte ids, then pad (256), bos (257), eos (258).

    Initialization: `init_scheme` picks the formula (see `initialization_ramanujan.weight_std`). The default is
    "normal" (GPT-2's rule) because it trained best in docs/init-study.md; "ramanujan" is the seed's scheme.
    `ramanujan_depth` / `ramanujan_transition` set R and T of the seed's schedule (None: derived from depth);
    `ramanujan_gain` multiplies every decoder weight's std. `attention_scale_alpha` / `attention_scale_decay`
    give layer l the attention scale 1 / (√head_dim · (1 + α·e^(−λ·l))); α = 0 is the standard scale, and
    α = None takes the scheme's own: the seed's 0.3 for "ramanujan", 0 for the baselines.
    Ablation switches, to take the Ramanujan scheme apart: `embedding_init_scheme` / `lm_head_init_scheme`
    draw the embedding / untied head with another scheme's rule (None: `init_scheme`'s), and
    `ramanujan_layer_schedule=False` drops the per-layer multiplier (σ = gain/√fan_in in every layer).
    """

    model_type = "ramanujan"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta = 10000.0

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
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    output_router_logits: bool = False

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

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.attention_scale_alpha is None:
            self.attention_scale_alpha = SEED_ATTENTION_SCALE_ALPHA if self.init_scheme == "ramanujan" else 0.0
        self._check_values()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        try:  # as LlamaConfig does; Transformers reports a missing rope key as KeyError
            self.validate_rope()
        except KeyError as error:
            raise ValueError(f"rope_parameters: {error.args[0]}") from None

    def _check_values(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "moe_intermediate_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2):
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
        for name in ("num_experts", "num_shared_experts", "first_k_dense_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts "
                f"({self.num_experts})"
            )
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"init_scheme {self.init_scheme!r} is unknown; valid schemes: {', '.join(INIT_SCHEMES)}")
        for name in ("embedding_init_scheme", "lm_head_init_scheme"):
            value = getattr(self, name)
            if value is not None and value not in INIT_SCHEMES:
                raise ValueError(f"{name} {value!r} is unknown; valid: None or one of {', '.join(INIT_SCHEMES)}")
        if not isinstance(self.ramanujan_layer_schedule, bool):
            raise ValueError(f"ramanujan_layer_schedule must be True or False, got {self.ramanujan_layer_schedule!r}")
        for name in ("ramanujan_depth", "ramanujan_transition"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")
        if self.ramanujan_gain <= 0 or self.initializer_range <= 0:
            raise ValueError(
                f"ramanujan_gain ({self.ramanujan_gain}) and initializer_range ({self.initializer_range}) must be > 0"
            )
        if self.attention_scale_alpha <= -1:
            raise ValueError(f"attention_scale_alpha must be > -1 (the scale stays positive), got {self.attention_scale_alpha}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The first `first_k_dense_layers` layers stay dense; the rest use experts when num_experts > 0."""
        return self.num_experts > 0 and layer_idx >= self.first_k_dense_layers

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
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)} for RamanujanConfig")
        return cls(**{**values, **overrides})


__all__ = ["RamanujanConfig"]
