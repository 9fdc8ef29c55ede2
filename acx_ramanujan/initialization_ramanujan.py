"""Initialization math: the Ramanujan recurrence, its per-layer schedule, and the baseline schemes.

Everything here is pure: numbers in, numbers out. `modeling_ramanujan.RamanujanPreTrainedModel._init_weights`
asks `weight_std` for the standard deviation of each weight and draws it; nothing in this module touches a tensor.

Source of the Ramanujan scheme: the seed project ACX-Ramanujan-Transformer v1.6 (`RamanujanInitializer`).
The seed's claims about it ("strict variance preservation", "infinite depth", faster convergence) are
hypotheses; docs/init-study.md reports what we measured.
"""

import math

INIT_SCHEMES = ("ramanujan", "normal", "xavier", "kaiming", "small_wang", "mitchell")

# Output projections write into the residual stream; several baselines scale them down with depth.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")

# Weight roles `weight_std` understands; modeling tags every initialized weight with one of them.
ROLES = ("linear", "output_projection", "router", "embedding", "lm_head")


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
      ("linear")
    o_proj, down_proj, experts' down       g·s(l)/√in        r/√(2L)   √(2/(in+out))   √(2/in)   2/(L·√d)    1/√(2·in·(l+1))
      ("output_projection")
    router ("router")                      0.1·s(l)/√in      r         r               r         r           r
    embedding ("embedding")                r·√(1/peak)       r         r               r         r           r
    untied lm_head, classifier ("lm_head") 1/in              r         r               r         r           r
    RMSNorm weights (not here)             1 in every scheme

    in/out: the weight's fan-in/fan-out (per expert for fused experts); l its decoder layer (from 0); L layers;
    d hidden size; r initializer_range; g ramanujan_gain; s(l) `ramanujan_layer_scales`; peak `ramanujan_peak`.
    The Ramanujan scheme draws from a normal truncated at ±2σ, the others from plain normals. Sources:
      ramanujan   the seed, ACX-Ramanujan-Transformer v1.6 (`RamanujanInitializer`).
      normal      GPT-2 (Radford et al. 2019): N(0, r), residual outputs ÷ √(2L).
      xavier      Glorot & Bengio 2010, normal.      kaiming  He et al. 2015, normal, fan_in, gain √2.
      small_wang  GPT-NeoX (Black et al. 2022): small_init and wang_init.
      mitchell    OLMo (Groeneveld et al. 2024).
    Baselines use r for embeddings, lm_head and router, as Llama does.
    """
    scheme = scheme_for_role(config, role)
    num_layers = config.num_hidden_layers
    d = config.hidden_size
    if role not in ROLES:
        raise ValueError(f"weight_std: unknown role {role!r}; expected one of {ROLES}")
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
    raise ValueError(f"unknown init_scheme {scheme!r}; expected one of {INIT_SCHEMES}")


def attention_scaling(head_dim: int, layer_idx: int, alpha: float, decay: float) -> float:
    """The seed's per-layer attention temperature: 1 / (√head_dim · (1 + α·e^(−λ·l))). α = 0 is standard."""
    return 1.0 / (math.sqrt(head_dim) * (1.0 + alpha * math.exp(-decay * layer_idx)))
