"""The seed's own depth experiment: a plain chain of N square layers, no norm, no residual.

x_{l+1} = act(W_l x_l) with act = identity ("linear") or ReLU, W_l (d×d) drawn with the package's own
`weight_std(config, "linear", d, d, l)` for the scheme (truncated at ±2σ for "ramanujan", as modeling draws it).

Closed form (expectation over the weights, any fixed input): E‖W x‖² = d·σ²·‖x‖² for W with i.i.d. zero-mean
entries of variance σ², and E‖relu(W x)‖² = d·σ²·‖x‖²/2 because each pre-activation is symmetric. So the mean
square after L layers is m_0 · Π_l d·σ_l²·g with g = 1 (linear) or 1/2 (ReLU) — He et al. 2015, §2.2.
A normal truncated at ±2σ has variance σ²·TRUNCATED_VARIANCE_FACTOR.

Both chains are positively homogeneous, so the input of every layer is rescaled to unit mean square and the
log of the scale is accumulated: log10 of the mean square is exact at any depth, with no under- or overflow.
"""

import math

import torch

from ..configuration_ramanujan import RamanujanConfig
from ..initialization_ramanujan import weight_std

ACTIVATIONS = ("linear", "relu")

# Var of N(0,1) truncated to [-2, 2]: 1 − 2·2φ(2)/(Φ(2) − Φ(−2)).
_phi2 = math.exp(-2.0) / math.sqrt(2.0 * math.pi)
_mass = math.erf(2.0 / math.sqrt(2.0))
TRUNCATED_VARIANCE_FACTOR = 1.0 - 4.0 * _phi2 / _mass


def chain_config(scheme: str, depth: int, width: int) -> RamanujanConfig:
    """A config that only serves `weight_std`: `depth` layers of width `width` under `scheme`."""
    return RamanujanConfig(
        init_scheme=scheme, num_hidden_layers=depth, hidden_size=width, intermediate_size=width, num_attention_heads=1
    )


def chain_stds(scheme: str, depth: int, width: int) -> list[float]:
    config = chain_config(scheme, depth, width)
    return [weight_std(config, "linear", width, width, layer) for layer in range(depth)]


def effective_variance(scheme: str, std: float) -> float:
    """Variance of the drawn entries: truncation at ±2σ shrinks it for the Ramanujan scheme."""
    return std**2 * (TRUNCATED_VARIANCE_FACTOR if scheme == "ramanujan" else 1.0)


def chain_closed_form_log10(scheme: str, depth: int, width: int, activation: str) -> list[float]:
    """log10 E[mean square] after each layer (index 0 = the unit-mean-square input)."""
    gain = 1.0 if activation == "linear" else 0.5
    values = [0.0]
    for std in chain_stds(scheme, depth, width):
        values.append(values[-1] + math.log10(width * effective_variance(scheme, std) * gain))
    return values


def chain_measured_log10(
    scheme: str, depth: int, width: int, activation: str, batch: int = 256, seed: int = 0, dtype=torch.float64
) -> list[float]:
    """log10 of the measured mean square after each layer for one chain (index 0 = the input)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, width, generator=generator, dtype=dtype)
    x = x / x.pow(2).mean().sqrt()
    values = [0.0]
    for std in chain_stds(scheme, depth, width):
        weight = torch.empty(width, width, dtype=dtype)
        if scheme == "ramanujan":
            torch.nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std, generator=generator)
        else:
            torch.nn.init.normal_(weight, std=std, generator=generator)
        x = x @ weight.T
        if activation == "relu":
            x = torch.relu(x)
        mean_square = x.pow(2).mean()
        if mean_square == 0 or not torch.isfinite(mean_square):
            values.extend([float("-inf") if mean_square == 0 else float("nan")] * (depth + 1 - len(values)))
            break
        values.append(values[-1] + math.log10(mean_square.item()))
        x = x / mean_square.sqrt()
    return values
