"""The initialization study's tools: their numbers against closed forms and second implementations."""

import json
import math

import pytest
import torch
from conftest import tiny_config, tiny_moe_config

from acx_ramanujan import RamanujanForCausalLM
from acx_ramanujan.initialization_ramanujan import ramanujan_schedule, weight_std
from acx_ramanujan.study import verify
from acx_ramanujan.study.chains import (
    TRUNCATED_VARIANCE_FACTOR,
    chain_closed_form_log10,
    chain_measured_log10,
)
from acx_ramanujan.study.probes import byte_token_batch, layer_gradient_norms, residual_rms_per_layer, residual_stream


def mean_ratio_to_closed_form(scheme, depth, width, activation, trials):
    """Average over independent chains of measured / expected mean square after `depth` layers."""
    expected = chain_closed_form_log10(scheme, depth, width, activation)[-1]
    ratios = [
        10 ** (chain_measured_log10(scheme, depth, width, activation, batch=32, seed=seed)[-1] - expected)
        for seed in range(trials)
    ]
    return sum(ratios) / trials


def test_truncated_normal_variance_factor_matches_numeric_integral():
    x = torch.linspace(-2.0, 2.0, 200_001, dtype=torch.float64)
    density = torch.exp(-x**2 / 2)
    factor = torch.trapezoid(x**2 * density, x) / torch.trapezoid(density, x)
    assert TRUNCATED_VARIANCE_FACTOR == pytest.approx(factor.item(), rel=1e-6)


def test_closed_forms_of_textbook_chains():
    # Xavier keeps a square linear chain's variance (d·1/d = 1); He keeps a ReLU chain's (d·2/d·1/2 = 1);
    # Xavier halves a ReLU chain per layer; N(0, 0.02) multiplies a linear chain by d·0.0004 per layer.
    assert chain_closed_form_log10("xavier", 6, 64, "linear") == pytest.approx([0.0] * 7, abs=1e-12)
    assert chain_closed_form_log10("kaiming", 6, 64, "relu") == pytest.approx([0.0] * 7, abs=1e-12)
    assert chain_closed_form_log10("xavier", 6, 64, "relu")[-1] == pytest.approx(6 * math.log10(0.5))
    assert chain_closed_form_log10("normal", 6, 64, "linear")[-1] == pytest.approx(6 * math.log10(64 * 0.02**2))


def test_xavier_linear_chain_keeps_variance():
    assert mean_ratio_to_closed_form("xavier", 8, 128, "linear", trials=12) == pytest.approx(1.0, abs=0.1)


def test_kaiming_relu_chain_keeps_mean_square():
    assert mean_ratio_to_closed_form("kaiming", 6, 128, "relu", trials=24) == pytest.approx(1.0, abs=0.3)


def test_ramanujan_chain_constant_scale_tail_shrinks_by_truncation_factor():
    # 12 layers: R = 4, T = 4, and the blend starts at scale 1, so layers 4..11 all have σ = 1/√d drawn from a
    # normal truncated at ±2σ: each multiplies the mean square by the truncated variance factor (≈ 0.774).
    depth, width = 12, 128
    assert ramanujan_schedule(depth)[4:] == pytest.approx([1.0] * 8)
    tails = [
        chain_measured_log10("ramanujan", depth, width, "linear", batch=32, seed=seed)
        for seed in range(8)
    ]
    measured = sum(10 ** (tail[12] - tail[4]) for tail in tails) / len(tails)
    assert measured == pytest.approx(TRUNCATED_VARIANCE_FACTOR**8, rel=0.1)
    # and the whole chain, schedule included, against its closed form
    assert mean_ratio_to_closed_form("ramanujan", depth, width, "linear", trials=8) == pytest.approx(1.0, abs=0.1)


def test_residual_hooks_match_output_hidden_states():
    torch.manual_seed(0)
    model = RamanujanForCausalLM(tiny_config(num_hidden_layers=3)).eval()
    input_ids = byte_token_batch(None, 2, 16, 259, seed=0)
    hooked = residual_stream(model, input_ids)
    with torch.no_grad():
        reference = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    assert len(hooked) == 4
    for index in range(3):  # the last entry of hidden_states is after the final norm, by convention
        torch.testing.assert_close(hooked[index], reference[index])


@pytest.mark.parametrize("scheme", ["normal", "ramanujan"])
def test_embedding_rms_matches_the_scheme_std(scheme):
    config = tiny_config(hidden_size=64, num_hidden_layers=4, init_scheme=scheme)
    torch.manual_seed(0)
    model = RamanujanForCausalLM(config)
    rms = residual_rms_per_layer(model, byte_token_batch(None, 16, 64, 259, seed=1))
    variance = weight_std(config, "embedding", 64, 259) ** 2
    if scheme == "ramanujan":
        variance *= TRUNCATED_VARIANCE_FACTOR
    assert rms[0] == pytest.approx(math.sqrt(variance), rel=0.05)


def test_gradient_norms_are_per_layer_norms_of_the_lm_loss_gradient():
    torch.manual_seed(0)
    model = RamanujanForCausalLM(tiny_moe_config(num_hidden_layers=2))
    input_ids = byte_token_batch(None, 2, 16, 259, seed=0)
    loss, norms = layer_gradient_norms(model, input_ids)
    outputs = model(input_ids=input_ids, labels=input_ids)
    grads = torch.autograd.grad(outputs.loss, list(model.model.layers[1].parameters()), allow_unused=True)
    expected = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
    assert loss == pytest.approx(outputs.loss.item())
    assert norms[1] == pytest.approx(expected, rel=1e-5)


def test_verify_cli_writes_reports(tmp_path, tiny_shakespeare):
    argv = ["--depth", "3", "--schemes", "ramanujan,xavier", "--hidden_size", "32", "--text_file", str(tiny_shakespeare),
            "--batch_size", "2", "--seq_len", "16", "--chain_width", "32", "--chain_batch", "8", "--output_dir", str(tmp_path)]
    assert verify.main(argv) == 0
    report = json.loads((tmp_path / "verify.json").read_text())
    assert set(report["stacks"]) == {"ramanujan", "xavier"}
    assert len(report["stacks"]["xavier"]["residual_rms"]) == 4 and len(report["stacks"]["xavier"]["grad_norm"]) == 3
    assert report["chains"]["linear"]["xavier"]["closed_form_log10"] == pytest.approx([0.0] * 4)
    assert {"verify.md", "verify_stacks.png", "verify_chains.png"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--depth", "0"], "--depth must be >= 1"),
        (["--depth", "2", "--schemes", "ramanujan,fancy"], "unknown init scheme 'fancy'"),
        (["--depth", "2", "--text_file", "/nonexistent.txt"], "not a readable file"),
    ],
)
def test_verify_rejects_bad_input(tmp_path, capsys, argv, message):
    assert verify.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
