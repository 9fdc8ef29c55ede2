"""Initialization math: the Ramanujan recurrence, its per-layer schedule, and the baseline schemes.

Everything here is pure: numbers in, numbers out. `modeling_ramanujan.RamanujanPreTrainedModel._init_weights`
asks `weight_std` for the standard deviation of each weight and draws it; nothing in this module touches a tensor.

Source of the Ramanujan scheme: the seed project ACX-Ramanujan-Transformer v1.6 (`RamanujanInitializer`).
The seed's claims about it ("strict variance preservation", "infinite depth", faster convergence) are
hypotheses; docs/init-study.md reports what we measured.
"""

import math

INIT_SCHEMES = ("ramanujan", "normal", "xavier", "kaiming", "small_wang", "mitchell", "depth_scaled", "deepnorm")

# Init schemes whose rule is itself a depth scaling: they do not combine with the depth parametrizations below,
# which replace any depth scaling of the initialization.
DEPTH_SCALED_INITS = ("depth_scaled", "deepnorm")

# Output projections write into the residual stream; several baselines scale them down with depth.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")

# Weight roles `weight_std` understands; modeling tags every initialized weight with one of them, by the name of
# its module: "value_projection" v_proj, "gate_projection" / "up_projection" the SwiGLU's gate_proj / up_proj (and
# the two halves of the experts' fused gate_up_proj), "output_projection" OUTPUT_PROJECTIONS (and the experts'
# down_proj), "linear" every other decoder weight (q_proj, k_proj). Only depth_scaled and deepnorm tell the
# value, gate and up projections apart from "linear".
ROLES = ("linear", "value_projection", "gate_projection", "up_projection", "output_projection", "router", "embedding",
         "lm_head")

# Depth parametrizations: residual-branch exponent α of each (the branch multiplier is (L/L0)^-α).
DEPTH_PARAMETRIZATIONS = {"completep": 1.0, "depth_mup": 0.5}


def ramanujan_coefficients(n: int) -> list[float]:
    """a_0..a_n of the seed's recurrence.

    a_0 = 1, a_1 = π/√3, a_{k+1} = (π²/k²)·a_k + 2π/(k(k+1))·a_{k-1}   (k ≥ 1).
    """
    if n < 0:
        raise ValueError(f"ramanujan_coefficients: n must be >= 0, got {n}")
    coefficients = [1.0, math.pi / math.sqrt(3.0)]
    for k in range(1, n):
        a_next = (math.pi**2 / k**2) * coefficients[k] + 2.0 * math.pi / (k * (k + 1)) * coefficients[k - 1]
        coefficients.append(a_next)
    return coefficients[: n + 1]


def ramanujan_depth_and_transition(num_layers: int, depth: int | None, transition: int | None) -> tuple[int, int]:
    """The seed's R (layers on the recurrence) and T (layers blending to 1), clamped to the stack.

    R = depth or min(8, max(4, L//3)); T = transition or min(16, max(4, L//4)); then R = min(R, L) and
    T = max(0, min(T, L - R)). The seed did not clamp T, which could go negative for shallow stacks.
    """
    r = depth if depth is not None else min(8, max(4, num_layers // 3))
    t = transition if transition is not None else min(16, max(4, num_layers // 4))
    r = min(r, num_layers)
    t = max(0, min(t, num_layers - r))
    return r, t


def ramanujan_schedule(num_layers: int, depth: int | None = None, transition: int | None = None) -> list[float]:
    """One multiplier per decoder layer, from the recurrence.

    scale(l) = max(0.1, √(|a_l|/peak)) for l < R; for R ≤ l < R+T a linear blend from
    max(0.1, √(|a_R|/peak)) to 1 with t = (l-R)/T; 1 after that; peak = max_{k≤R} |a_k|.
    The seed numbered every `nn.Linear` in module order; we number by decoder layer, which is what its
    depth formula (in layers) assumes.
    """
    r, t = ramanujan_depth_and_transition(num_layers, depth, transition)
    a = ramanujan_coefficients(max(r, 1))
    peak = max(abs(x) for x in a[: r + 1])
    start = max(0.1, math.sqrt(abs(a[r]) / peak))
    scales = []
    for layer in range(num_layers):
        if layer < r:
            scales.append(max(0.1, math.sqrt(abs(a[layer]) / peak)))
        elif layer < r + t:
            blend = (layer - r) / t
            scales.append(start + (1.0 - start) * blend)
        else:
            scales.append(1.0)
    return scales


def ramanujan_peak(num_layers: int, depth: int | None = None, transition: int | None = None) -> float:
    """peak = max_{k≤R} |a_k|, which also sets the seed's embedding std."""
    r, _ = ramanujan_depth_and_transition(num_layers, depth, transition)
    return max(abs(x) for x in ramanujan_coefficients(max(r, 1))[: r + 1])


def ramanujan_layer_scales(config) -> list[float]:
    """The per-layer multipliers for a `RamanujanConfig` (all 1 when `ramanujan_layer_schedule` is off)."""
    if not getattr(config, "ramanujan_layer_schedule", True):
        return [1.0] * config.num_hidden_layers
    return ramanujan_schedule(config.num_hidden_layers, config.ramanujan_depth, config.ramanujan_transition)


def scheme_for_role(config, role: str) -> str:
    """The scheme whose rule draws `role`: `embedding_init_scheme` / `lm_head_init_scheme` when set, else init_scheme.

    These switches exist to take the Ramanujan scheme apart (docs/init-study.md).
    """
    field = {"embedding": "embedding_init_scheme", "lm_head": "lm_head_init_scheme"}.get(role)
    override = getattr(config, field, None) if field else None
    return override or config.init_scheme


def weight_std(config, role: str, fan_in: int, fan_out: int, layer_idx: int | None = None) -> float:
    """Standard deviation of a weight under its scheme (`scheme_for_role`: `config.init_scheme` unless an ablation
    switch names another for the embedding or head). Every weight's rule, per scheme:

    weight (role)                          ramanujan         normal    xavier          kaiming   small_wang  mitchell
    q/k/v, gate/up, experts' gate_up       g·s(l)/√in        r         √(2/(in+out))   √(2/in)   √(2/(5d))   1/√in
      ("linear", "value_projection", "gate_projection", "up_projection")
    o_proj, down_proj, experts' down       g·s(l)/√in        r/√(2L)   √(2/(in+out))   √(2/in)   2/(L·√d)    1/√(2·in·(l+1))
      ("output_projection")
    router ("router")                      0.1·s(l)/√in      r         r               r         r           r
    embedding ("embedding")                r·√(1/peak)       r         r               r         r           r
    untied lm_head, classifier ("lm_head") 1/in              r         r               r         r           r
    RMSNorm weights (not here)             1 in every scheme

    The two depth-scaled schemes tell the value, gate and up projections apart:

    weight (role)                          depth_scaled      deepnorm
    q/k ("linear")                         r                 √(2/(in+out))
    v, gate ("value_projection",           r                 β·√(2/(in+out))
      "gate_projection")
    up ("up_projection")                   r/√(2(l+1))       β·√(2/(in+out))
    o_proj, down_proj, experts' down       r/√(2(l+1))       β·√(2/(in+out))
    router, embedding, lm_head             r                 r

    in/out: the weight's fan-in/fan-out (per expert for fused experts, per half for their gate_up); l its decoder
    layer (from 0); L layers; d hidden size; r initializer_range; g ramanujan_gain; s(l) `ramanujan_layer_scales`;
    peak `ramanujan_peak`; β = (8L)^(-1/4) (`deepnorm_beta`).
    With a depth parametrization or LayerNorm Scaling (`replaces_scaled_init`), output projections are drawn by
    their scheme's q/k rule instead (normal: r; small_wang: √(2/(5d)); mitchell: 1/√in): both remove the depth
    scaling of the initialization; depth_scaled and deepnorm, which are nothing but such a scaling, are refused with
    them (`DEPTH_SCALED_INITS`).
    The Ramanujan scheme draws from a normal truncated at ±2σ, the others from plain normals. Sources:
      ramanujan     the seed, ACX-Ramanujan-Transformer v1.6 (`RamanujanInitializer`).
      normal        GPT-2 (Radford et al. 2019): N(0, r), residual outputs ÷ √(2L).
      xavier        Glorot & Bengio 2010, normal.      kaiming  He et al. 2015, normal, fan_in, gain √2.
      small_wang    GPT-NeoX (Black et al. 2022): small_init and wang_init.
      mitchell      OLMo (Groeneveld et al. 2024).
      depth_scaled  torchtitan's `depth_init` (torchtitan/models/llama3/model/model.py, `TransformerBlock`:
                    0.02/√(2(layer_id+1)) for wo, w2 and w3, 0.02 for wq, wk, wv, w1), with r for 0.02; OLMo-core's
                    `InitMethod.llama_depth` (olmo_core/nn/transformer/init.py) scales w_out and w3 the same way but
                    not w2. Both also draw the embedding with std 1 and the head with 1/√d; here they keep r, as
                    `normal` does, so that only the depth rule differs.
      deepnorm      DeepNet (Wang et al. 2022, arXiv 2203.00555), its DeepNorm pseudocode: xavier_normal_ with
                    gain β = (8L)^(-1/4) for the FFN, v_proj and out_proj, gain 1 for q_proj and k_proj
                    (decoder-only). torchscale's code (torchscale/architecture/decoder.py, `Decoder`) divides fc1,
                    fc2, out_proj and v_proj by the same (8L)^(1/4) after its modules' own init. Pairs with
                    `config.deepnorm`, the post-norm residual.
    Baselines use r for embeddings, lm_head and router, as Llama does.
    """
    if role not in ROLES:
        raise ValueError(f"weight_std: unknown role {role!r}; expected one of {ROLES}")
    scheme = scheme_for_role(config, role)
    num_layers = config.num_hidden_layers
    d = config.hidden_size
    if scheme not in DEPTH_SCALED_INITS and role in ("value_projection", "gate_projection", "up_projection"):
        role = "linear"
    if role == "output_projection" and replaces_scaled_init(config):
        role = "linear"
    if scheme == "ramanujan":
        if role == "embedding":
            return config.initializer_range * math.sqrt(1.0 / ramanujan_peak(num_layers, config.ramanujan_depth, config.ramanujan_transition))
        if role == "lm_head":
            return 1.0 / fan_in
        gain = 0.1 if role == "router" else config.ramanujan_gain
        return gain * ramanujan_layer_scales(config)[layer_idx] / math.sqrt(fan_in)
    if role in ("embedding", "lm_head", "router"):
        return config.initializer_range
    output = role == "output_projection"
    if scheme == "normal":
        return config.initializer_range / math.sqrt(2.0 * num_layers) if output else config.initializer_range
    if scheme == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if scheme == "kaiming":
        return math.sqrt(2.0 / fan_in)
    if scheme == "small_wang":
        return 2.0 / (num_layers * math.sqrt(d)) if output else math.sqrt(2.0 / (5.0 * d))
    if scheme == "mitchell":
        return 1.0 / math.sqrt(2.0 * fan_in * (layer_idx + 1)) if output else 1.0 / math.sqrt(fan_in)
    if scheme == "depth_scaled":
        scaled = output or role == "up_projection"
        return config.initializer_range / math.sqrt(2.0 * (layer_idx + 1)) if scaled else config.initializer_range
    if scheme == "deepnorm":
        gain = 1.0 if role == "linear" else deepnorm_beta(num_layers)
        return gain * math.sqrt(2.0 / (fan_in + fan_out))
    raise ValueError(f"unknown init_scheme {scheme!r}; expected one of {INIT_SCHEMES}")


def replaces_scaled_init(config) -> bool:
    """Whether the config uses a scheme that drops the depth scaling of the output projections' init: CompleteP and
    depth-μP (their init variance does not depend on depth; nanoGPT-mup's `GPT.__init__` skips the 1/√(2L) of
    c_proj under μP), and LayerNorm Scaling (arXiv 2502.05795, footnote 1: combined with scaled initialization it
    loses its effect, "we recommend removing the latter")."""
    return config.depth_parametrization is not None or config.layernorm_scaling


def residual_multiplier(config) -> float | None:
    """The constant multiplier of every attention and MLP/MoE branch, (L/L0)^-α (L = num_hidden_layers, L0 =
    depth_base_layers; α = 1 CompleteP, 1/2 depth-μP), or None without a depth parametrization.

    Sources: CompleteP (Dey et al. 2025, arXiv 2505.01618) and EleutherAI/nanoGPT-mup's model.py (`Block`:
    x + depth_multiplier^(-depth_alpha_exp)·branch(x), depth_multiplier = depth / base depth); depth-μP (Yang et al.
    2023, arXiv 2310.02244; Bordelon et al. 2023, arXiv 2309.16620): the branch × 1/√L.
    """
    if config.depth_parametrization is None:
        return None
    alpha = DEPTH_PARAMETRIZATIONS[config.depth_parametrization]
    return (config.num_hidden_layers / config.depth_base_layers) ** -alpha


def hidden_optimizer_factors(config) -> tuple[float, float]:
    """(learning-rate factor, AdamW ε factor) for the decoder layers' parameters (weights and norms; embeddings,
    final norm and head keep the base values): ((L/L0)^(α−1), (L/L0)^(−α)), or (1, 1) without a depth
    parametrization. CompleteP (α = 1) keeps the learning rate constant in depth; depth-μP (α = 1/2) scales Adam's
    by 1/√(L/L0), the rule of arXiv 2310.02244 for Adam. Source: nanoGPT-mup's `configure_optimizers`
    (`depth_lr_scaling` on the hidden weights, norms and biases; `hidden_adam_eps` ∝ depth_multiplier^(-α), which its
    comment takes from eq. 40 of arXiv 2505.01618). Its weight decay has no depth factor (only a width one, 1
    here); with decoupled AdamW the per-step decay lr·λ follows the group's learning rate.
    """
    if config.depth_parametrization is None:
        return 1.0, 1.0
    alpha = DEPTH_PARAMETRIZATIONS[config.depth_parametrization]
    ratio = config.num_hidden_layers / config.depth_base_layers
    return ratio ** (alpha - 1.0), ratio**-alpha


def layernorm_scale(config, layer_idx: int) -> float:
    """LayerNorm Scaling (Sun et al. 2025, arXiv 2502.05795): both pre-norms of decoder layer l (from 0) have their
    output × 1/√(l+1), i.e. 1/√ℓ with ℓ counted from 1; the final norm is not scaled. As in the authors' code
    (lmsdss/LayerNorm-Scaling, peft_pretraining/modeling_llama.py, norm type "LNS": scale_factor = 1 /
    math.sqrt(layer_index + 1) after input_layernorm and after post_attention_layernorm). 1 when off."""
    return 1.0 / math.sqrt(layer_idx + 1) if config.layernorm_scaling else 1.0


def deepnorm_alpha(num_layers: int) -> float:
    """DeepNorm's residual weight for a decoder-only stack of N layers: x ← Norm(α·x + f(x)), α = (2N)^(1/4)
    (arXiv 2203.00555, its table of α and β; torchscale's `DecoderLayer`: math.pow(2.0 * decoder_layers, 0.25))."""
    return (2.0 * num_layers) ** 0.25


def deepnorm_beta(num_layers: int) -> float:
    """DeepNorm's init gain for a decoder-only stack of N layers: β = (8N)^(-1/4) (arXiv 2203.00555, its table of α and β;
    torchscale's `Decoder`: init_scale = math.pow(8.0 * decoder_layers, 0.25), weights divided by it)."""
    return (8.0 * num_layers) ** -0.25


def attention_scaling(head_dim: int, layer_idx: int, alpha: float, decay: float) -> float:
    """The seed's per-layer attention temperature: 1 / (√head_dim · (1 + α·e^(−λ·l))). α = 0 is standard."""
    return 1.0 / (math.sqrt(head_dim) * (1.0 + alpha * math.exp(-decay * layer_idx)))
