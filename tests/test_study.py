"""The initialization study's tools: their numbers against closed forms and second implementations."""

import json
import math

import pytest
import torch
from conftest import tiny_config, tiny_moe_config

from acx_ramanujan import RamanujanByteTokenizer, RamanujanForCausalLM
from acx_ramanujan.initialization_ramanujan import ramanujan_schedule, weight_std
from acx_ramanujan.study import compare_init, grid_report, verify, visualize
from acx_ramanujan.study.chains import (
    TRUNCATED_VARIANCE_FACTOR,
    chain_closed_form_log10,
    chain_measured_log10,
)
from acx_ramanujan.study.probes import (
    attention_maps,
    byte_token_batch,
    expert_load_per_layer,
    layer_drop_losses,
    layer_gradient_norms,
    lm_loss,
    residual_rms_per_layer,
    residual_stream,
)
from acx_ramanujan.training.pretrain import training_arguments


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


@pytest.mark.parametrize("make", [tiny_config, lambda **kw: tiny_moe_config(num_shared_experts=1, **kw)])
def test_skipping_a_layer_is_zeroing_its_branches(make):
    """A pre-norm layer whose o_proj and down_proj are zero adds nothing to the residual stream: the loss without
    layer l equals the loss of a copy whose layer l has those weights zeroed."""
    torch.manual_seed(0)
    model = RamanujanForCausalLM(make(num_hidden_layers=3)).eval()
    input_ids = byte_token_batch(None, 2, 16, 259, seed=0)
    loss, dropped = layer_drop_losses(model, input_ids)
    assert len(model.model.layers) == 3 and loss == lm_loss(model, input_ids)  # the layers are put back
    for layer in range(3):
        copy = RamanujanForCausalLM(model.config).eval()
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        for name in state:
            if name.startswith(f"model.layers.{layer}.") and ("o_proj" in name or "down_proj" in name):
                state[name].zero_()
        copy.load_state_dict(state)
        assert dropped[layer] == pytest.approx(lm_loss(copy, input_ids), abs=1e-6)
    assert len(set(dropped)) == 3 and loss not in dropped


def test_lm_loss_is_the_models_own_loss():
    torch.manual_seed(0)
    model = RamanujanForCausalLM(tiny_config()).eval()
    input_ids = byte_token_batch(None, 3, 20, 259, seed=2)
    with torch.no_grad():
        assert lm_loss(model, input_ids) == pytest.approx(model(input_ids=input_ids, labels=input_ids).loss.item(), rel=1e-6)


def test_verify_cli_writes_reports(tmp_path, text_corpus):
    argv = ["--depth", "3", "--schemes", "ramanujan,xavier", "--hidden_size", "32", "--text_file", str(text_corpus),
            "--batch_size", "2", "--seq_len", "16", "--chain_width", "32", "--chain_batch", "8", "--output_dir", str(tmp_path)]
    assert verify.main(argv) == 0
    report = json.loads((tmp_path / "verify.json").read_text())
    assert set(report["stacks"]) == {"ramanujan", "xavier"}
    assert len(report["stacks"]["xavier"]["residual_rms"]) == 4 and len(report["stacks"]["xavier"]["grad_norm"]) == 3
    assert report["chains"]["linear"]["xavier"]["closed_form_log10"] == pytest.approx([0.0] * 4)
    assert {"verify.md", "verify_stacks.png", "verify_chains.png"} <= {p.name for p in tmp_path.iterdir()}


def test_verify_builds_the_deepnorm_scheme_with_post_norm_layers(tmp_path):
    """Each post-norm layer ends with an RMSNorm of weight 1: the residual stream leaves every layer at RMS 1."""
    argv = ["--depth", "4", "--schemes", "deepnorm,depth_scaled", "--hidden_size", "32", "--batch_size", "2",
            "--seq_len", "16", "--no_chains", "--output_dir", str(tmp_path)]
    assert verify.main(argv) == 0
    stacks = json.loads((tmp_path / "verify.json").read_text())["stacks"]
    assert stacks["deepnorm"]["residual_rms"][1:] == pytest.approx([1.0] * 4, rel=1e-3)
    assert max(stacks["depth_scaled"]["residual_rms"]) < 0.5  # pre-norm: the stream stays near the embeddings' 0.02


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--depth", "0"], "--depth must be >= 1"),
        (["--depth", "2", "--schemes", "ramanujan,fancy"], "unknown init scheme 'fancy'"),
        (["--depth", "2", "--text_file", "/nonexistent.txt"], "not a readable file"),
        (["--depth", "2", "--config_name", "nosuch"], "unknown preset 'nosuch'"),
        (["--depth", "2", "--hidden_size", "130"], "hidden_size (130) must be divisible by num_attention_heads"),
        (["--depth", "2", "--text_file", "TMP/two_bytes.txt"], "holds 2 bytes; need more than --seq_len 64"),
    ],
)
def test_verify_rejects_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "two_bytes.txt").write_bytes(b"ab")
    argv = [arg.replace("TMP", str(tmp_path)) for arg in argv]
    assert verify.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- visualize


@pytest.fixture(scope="module")
def saved_moe_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("moe-checkpoint")
    RamanujanForCausalLM(tiny_moe_config(num_hidden_layers=2, first_k_dense_layers=1)).save_pretrained(path)
    return path


def test_attention_maps_are_causal_probabilities(saved_moe_checkpoint):
    model = RamanujanForCausalLM.from_pretrained(saved_moe_checkpoint, attn_implementation="eager").eval()
    maps = attention_maps(model, byte_token_batch(None, 1, 12, 259, seed=0))
    assert len(maps) == 2 and maps[0].shape == (4, 12, 12)
    for layer_maps in maps:
        torch.testing.assert_close(layer_maps.sum(-1), torch.ones(4, 12))
        assert torch.all(layer_maps.triu(diagonal=1) == 0)


def test_expert_load_matches_a_naive_count(saved_moe_checkpoint):
    model = RamanujanForCausalLM.from_pretrained(saved_moe_checkpoint).eval()
    input_ids = byte_token_batch(None, 2, 10, 259, seed=0)
    load = expert_load_per_layer(model, input_ids)
    with torch.no_grad():
        router_logits = model(input_ids=input_ids, output_router_logits=True).router_logits
    assert load.shape == (1, 4)  # layer 0 stays dense
    counts = [0] * 4
    for token_logits in router_logits[0]:
        for expert in sorted(range(4), key=lambda e: -token_logits[e].item())[:2]:
            counts[expert] += 1
    assert load[0].tolist() == pytest.approx([count / 40 for count in counts])


def test_visualize_writes_every_plot_for_moe(saved_moe_checkpoint, tmp_path):
    assert visualize.main(["--checkpoint", str(saved_moe_checkpoint), "--output_dir", str(tmp_path), "--prompt", "To be"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"variance.png", "gradients.png", "attention.png", "experts.png"}


def test_visualize_rejects_bad_input(tmp_path, capsys):
    dense = tmp_path / "dense"
    RamanujanForCausalLM(tiny_config()).save_pretrained(dense)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "is not a readable checkpoint"),
        (["--checkpoint", str(broken)], "could not be loaded"),
        (["--checkpoint", str(dense), "--type", "experts"], "needs a mixture-of-experts checkpoint"),
    ]
    for argv, message in cases:
        assert visualize.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- compare-init


def compare_argv(tmp_path, *extra):
    text = tmp_path / "train.txt"
    if not text.exists():
        text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    return ["--layers", "1", "--seeds", "2", "--max_train_steps", "3", "--block_size", "16",
            "--per_device_train_batch_size", "2", "--train_file", str(text), "--output_dir", str(tmp_path / "bench"),
            "--config_overrides", "hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2",
            *extra]


def test_compare_init_trains_every_run_and_summarizes_from_the_run_files(tmp_path):
    argv = compare_argv(tmp_path, "--schemes", "normal", "--variant", "ram-no-alpha:init_scheme=ramanujan,attention_scale_alpha=0")
    assert compare_init.main(argv) == 0
    out = tmp_path / "bench"
    report = json.loads((out / "compare_init.json").read_text())
    final = {f"{name}-seed{seed}": json.loads((out / "runs" / f"1L-{name}-seed{seed}" / "eval_results.json").read_text())["eval_loss"]
             for name in ("normal", "ram-no-alpha") for seed in (0, 1)}
    summary = {row["variant"]: row for row in report["summary"]}
    ram = [final["ram-no-alpha-seed0"], final["ram-no-alpha-seed1"]]
    normal = [final["normal-seed0"], final["normal-seed1"]]
    assert summary["ram-no-alpha"]["eval_loss_mean"] == pytest.approx(sum(ram) / 2)
    assert summary["ram-no-alpha"]["eval_loss_std"] == pytest.approx(abs(ram[0] - ram[1]) / math.sqrt(2))
    assert summary["ram-no-alpha"]["delta_vs_reference_mean"] == pytest.approx((ram[0] - normal[0] + ram[1] - normal[1]) / 2)
    assert summary["normal"]["delta_vs_reference_mean"] == 0.0
    config = json.loads((out / "runs" / "1L-ram-no-alpha-seed1" / "config.json").read_text())
    assert (config["init_scheme"], config["attention_scale_alpha"], config["num_hidden_layers"]) == ("ramanujan", 0.0, 1)
    assert {"compare_init.md", "compare_init_loss.png"} <= {p.name for p in out.iterdir()}

    # a finished run is read back, not trained again
    stamp = (out / "runs" / "1L-normal-seed0" / "all_results.json").stat().st_mtime_ns
    assert compare_init.main(argv) == 0
    assert (out / "runs" / "1L-normal-seed0" / "all_results.json").stat().st_mtime_ns == stamp


def test_compare_init_trains_the_studys_fp32_recipe_on_any_hardware(tmp_path, monkeypatch):
    """Not acx-rt train's newer defaults (Muon; bf16 autocast where native): the recipe docs/init-study.md measured."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # conftest's fp32 pin, off: as on a user's machine
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert compare_init.main(compare_argv(tmp_path, "--schemes", "normal", "--seeds", "1")) == 0
    recorded = json.loads((tmp_path / "bench" / "runs" / "1L-normal-seed0" / "training_args.json").read_text())
    assert (recorded["mixed_precision"], recorded["optimizer"], recorded["sampling"]) == ("no", "adamw", "epochs")
    # and, by default, the rest of the recipe docs/init-study.md measured: no warmup, cosine to 0, betas (0.9, 0.999)
    assert (recorded["num_warmup_steps"], recorded["lr_scheduler_type"], recorded["adam_beta1"], recorded["adam_beta2"],
            recorded["learning_rate"], recorded["weight_decay"], recorded["max_grad_norm"]) == (
        0, "cosine", 0.9, 0.999, 1e-3, 0.1, 1.0)


def test_compare_init_learning_rate_grid_reports_best_and_transferred_rates(tmp_path):
    argv = compare_argv(tmp_path, "--depths", "1,2", "--seeds", "1", "--learning_rates", "1e-3,3e-3", "--schemes",
                        "normal", "--variant", "completep:depth_parametrization=completep,depth_base_layers=1",
                        "--optimizer", "muon", "--warmup_ratio", "0.34", "--adam_beta2", "0.95")
    assert compare_init.main(argv) == 0
    out = tmp_path / "bench"
    names = sorted(path.name for path in (out / "runs").iterdir())
    assert names == sorted(f"{layers}L-{variant}{rate}-seed0" for layers in (1, 2) for variant in ("normal", "completep")
                           for rate in ("", "-lr0.003"))  # the default rate is not named
    recorded = json.loads((out / "runs" / "2L-completep-lr0.003-seed0" / "training_args.json").read_text())
    assert (recorded["learning_rate"], recorded["optimizer"], recorded["num_warmup_steps"], recorded["adam_beta2"],
            recorded["muon_learning_rate"]) == (3e-3, "muon", 1, 0.95, training_arguments().muon_learning_rate)
    loss = {name: json.loads((out / "runs" / name / "all_results.json").read_text())["eval_loss"] for name in names}
    report = json.loads((out / "compare_init.json").read_text())
    named = {1e-3: "", 3e-3: "-lr0.003"}
    for row in report["learning_rate_transfer"]:
        at = {rate: loss[f"{row['layers']}L-{row['variant']}{named[rate]}-seed0"] for rate in named}
        base = {rate: loss[f"1L-{row['variant']}{named[rate]}-seed0"] for rate in named}
        assert row["best_learning_rate"] == min(at, key=at.get) and row["best_eval_loss"] == min(at.values())
        assert row["transferred_learning_rate"] == min(base, key=base.get)
        assert row["transferred_eval_loss"] == at[row["transferred_learning_rate"]]
    markdown = (out / "compare_init.md").read_text()
    assert "## Learning rates" in markdown and "## Depth probes" in markdown
    assert {"compare_init_depth.png", "compare_init_residual.png", "compare_init_loss.png"} <= {p.name for p in out.iterdir()}
    # the same comparison at the default rate alone reads its runs back: nothing is trained again
    stamps = {name: (out / "runs" / name / "all_results.json").stat().st_mtime_ns for name in names}
    assert compare_init.main([*argv, "--learning_rate", "1e-3"]) == 0
    assert {name: (out / "runs" / name / "all_results.json").stat().st_mtime_ns for name in names} == stamps
    # another Muon rate is another comparison: refused over these runs, trained with that rate in a new folder
    assert compare_init.main([*argv, "--muon_learning_rate", "0.01"]) == 2
    assert {name: (out / "runs" / name / "all_results.json").stat().st_mtime_ns for name in names} == stamps
    other = tmp_path / "other"
    assert compare_init.main([*argv, "--depths", "1", "--learning_rate", "1e-3", "--schemes", "", "--muon_learning_rate",
                              "0.01", "--output_dir", str(other)]) == 0
    assert json.loads((other / "runs" / "1L-completep-seed0" / "training_args.json").read_text())[
        "muon_learning_rate"] == 0.01


def test_compare_init_trains_the_deepnorm_scheme_with_post_norm_layers(tmp_path):
    assert compare_init.main(compare_argv(tmp_path, "--schemes", "deepnorm,normal", "--seeds", "1")) == 0
    configs = {name: json.loads((tmp_path / "bench" / "runs" / f"1L-{name}-seed0" / "config.json").read_text())
               for name in ("deepnorm", "normal")}
    assert (configs["deepnorm"]["init_scheme"], configs["deepnorm"]["deepnorm"]) == ("deepnorm", True)
    assert (configs["normal"]["init_scheme"], configs["normal"]["deepnorm"]) == ("normal", False)


def test_compare_init_probes_each_run_once_from_its_initial_and_final_model(tmp_path, monkeypatch):
    """depth_probes.json: the init probe reads the model `pretrain` started from, the final one the saved model."""
    from acx_ramanujan.training import pretrain as pretrain_module

    started = {}

    class Recorded(RamanujanForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            started[config.num_hidden_layers] = {k: v.clone() for k, v in self.state_dict().items()}

    monkeypatch.setattr(pretrain_module, "RamanujanForCausalLM", Recorded)
    argv = compare_argv(tmp_path, "--layers", "2", "--seeds", "1", "--schemes", "mitchell")
    assert compare_init.main(argv) == 0
    run = tmp_path / "bench" / "runs" / "2L-mitchell-seed0"
    probes = json.loads((run / compare_init.PROBES).read_text())
    input_ids = torch.tensor(probes_input(argv))
    initial = RamanujanForCausalLM(RamanujanForCausalLM.config_class.from_pretrained(run)).eval()
    initial.load_state_dict(started[2])
    assert probes["init"]["residual_rms"] == residual_rms_per_layer(initial, input_ids)
    assert probes["init"]["grad_norm"] == layer_gradient_norms(initial, input_ids)[1]
    final = RamanujanForCausalLM.from_pretrained(run).eval()
    assert probes["final"]["residual_rms"] == residual_rms_per_layer(final, input_ids)
    loss, dropped = layer_drop_losses(final, input_ids)
    assert probes["layer_drop"] == {"loss": loss, "delta": [value - loss for value in dropped]}
    assert len(probes["init"]["residual_rms"]) == 3 and len(probes["final"]["grad_norm"]) == 2

    stamp = (run / compare_init.PROBES).stat().st_mtime_ns
    assert compare_init.main(argv) == 0  # finished and probed: neither trained nor probed again
    assert (run / compare_init.PROBES).stat().st_mtime_ns == stamp
    (run / compare_init.PROBES).unlink()
    trained = (run / "all_results.json").stat().st_mtime_ns
    assert compare_init.main(argv) == 0  # finished, not probed: probed, not trained again
    assert json.loads((run / compare_init.PROBES).read_text()) == probes
    assert (run / "all_results.json").stat().st_mtime_ns == trained


def probes_input(argv) -> list[list[int]]:
    """The probe batch, read independently: the first validation blocks of the tail 10% of the training text."""
    from acx_ramanujan.training.data import load_raw_datasets, tokenize_and_pack

    text_file = argv[argv.index("--train_file") + 1]
    blocks = tokenize_and_pack(load_raw_datasets([text_file]), RamanujanByteTokenizer(), 16)["validation"]
    return blocks["input_ids"][: compare_init.PROBE_BLOCKS]


def test_a_run_whose_final_loss_is_nan_or_above_its_first_loss_counts_as_diverged(tmp_path):
    for name, final in (("nan", float("nan")), ("worse", 6.0), ("better", 4.0)):
        run = tmp_path / name
        run.mkdir()
        (run / "all_results.json").write_text(json.dumps({"eval_loss": final, "train_steps": 2, "train_runtime_s": 4.0}))
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n{"step": 2, "loss": 5.0}\n{"step": 2, "eval_loss": 1}\n')
    assert [compare_init.read_run(tmp_path / name)["diverged"] for name in ("nan", "worse", "better")] == [True, True, False]
    assert compare_init.read_run(tmp_path / "better")["steps_per_second"] == 0.5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--schemes", "normal,fancy"], "unknown init scheme 'fancy'"),
        (["--schemes", "normal", "--layers", "0"], "layer counts >= 1"),
        (["--variant", "no-colon"], "not of the form NAME:key=value"),
        (["--variant", "x:init_scheme=normal,no_such_field=1"], "unknown config field 'no_such_field'"),
        (["--variant", "x:embedding_init_scheme=fancy"], "embedding_init_scheme 'fancy' is unknown"),
        ([], "nothing to compare"),
        (["--schemes", "normal", "--block_size", "1000"], "--block_size 1000 exceeds the model's max_position_embeddings"),
        (["--variant", "x:max_position_embeddings=8"], "--block_size 16 exceeds the model's max_position_embeddings (8)"),
        (["--schemes", "normal", "--train_file", "TMP/empty.txt"], "empty.txt' is empty"),
        (["--schemes", "normal", "--learning_rates", "1e-3,fast"], "--learning_rates must be comma-separated numbers"),
        (["--schemes", "normal", "--learning_rate", "0"], "--learning_rates must be finite and > 0"),
        (["--schemes", "normal", "--learning_rates", "1e-3,1e-3"], "--learning_rates has a repeated rate"),
        (["--schemes", "normal", "--warmup_ratio", "1"], "--warmup_ratio must be in [0, 1)"),
        (["--schemes", "normal", "--adam_beta2", "1"], "--adam_beta2 must be in [0, 1)"),
        (["--schemes", "normal", "--muon_learning_rate", "4e-3"], "--muon_learning_rate applies only with --optimizer muon"),
        (["--schemes", "normal", "--optimizer", "muon", "--muon_learning_rate", "nan"],
         "--muon_learning_rate must be finite and > 0"),
        (["--variant", "x:depth_parametrization=completep"], "variant 'x' at 1 layers: depth_parametrization='completep' "
                                                             "needs depth_base_layers"),
    ],
)
def test_compare_init_rejects_bad_input_before_training(tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("")
    extra = [arg.replace("TMP", str(tmp_path)) for arg in extra]
    assert compare_init.main(compare_argv(tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_compare_init_reports_a_failing_run_in_one_line(tmp_path, capsys):
    (tmp_path / "one_line.txt").write_text("too short to hold out a validation tail\n")
    argv = compare_argv(tmp_path, "--schemes", "normal", "--seeds", "1", "--train_file", str(tmp_path / "one_line.txt"))
    assert compare_init.main(argv) == 1
    err = capsys.readouterr().err
    assert "acx-rt compare-init: error: training run" in err and "1L-normal-seed0 failed" in err
    assert "Traceback" not in err


def test_compare_init_reuses_a_finished_run_only_with_the_same_settings(tmp_path, capsys):
    argv = compare_argv(tmp_path, "--seeds", "1", "--variant", "ram:init_scheme=ramanujan")
    assert compare_init.main(argv) == 0
    run = tmp_path / "bench" / "runs" / "1L-ram-seed0"
    stamp = (run / "all_results.json").stat().st_mtime_ns
    # same settings, overrides spelled differently (same parsed fields): reused
    assert compare_init.main([*argv, "--config_overrides",
                           "num_key_value_heads=2,hidden_size=32,intermediate_size=64,num_attention_heads=2"]) == 0
    assert (run / "all_results.json").stat().st_mtime_ns == stamp
    capsys.readouterr()
    changed = [
        (["--max_train_steps", "4"], "max_train_steps=3, this comparison would use 4"),
        (["--block_size", "8"], "block_size=16"),
        (["--per_device_train_batch_size", "3"], "per_device_train_batch_size=2"),
        (["--variant", "ram:init_scheme=ramanujan,attention_scale_alpha=0"], "config_overrides="),
        (["--optimizer", "muon"], "optimizer='adamw', this comparison would use 'muon'"),
        (["--warmup_ratio", "0.5"], "num_warmup_steps=0, this comparison would use 2"),
        (["--adam_beta2", "0.95"], "adam_beta2=0.999"),
    ]
    for extra, message in changed:
        assert compare_init.main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("acx-rt compare-init: error: finished run ")
        assert str(run) in err and message in err and "another --output_dir or delete that run" in err
        assert (run / "all_results.json").stat().st_mtime_ns == stamp
    # another learning rate is another run (its rate in its name), trained beside this one
    assert compare_init.main([*argv, "--learning_rate", "0.01"]) == 0
    assert (run.parent / "1L-ram-lr0.01-seed0" / "all_results.json").is_file()
    assert (run / "all_results.json").stat().st_mtime_ns == stamp
    (run / "training_args.json").unlink()
    assert compare_init.main(argv) == 2
    assert "has no readable training_args.json" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- grid-report


def test_grid_report_collects_an_uneven_grid_from_several_compare_init_runs(tmp_path, capsys):
    """Two seeds at lr 1e-3, then one at 3e-3 (as a grid extended one rate at a time): the best rate is chosen on the
    seed both rates ran (seed 0), reported with every seed it has, and paired with the reference at the reference's
    own best rate; checked against the runs' own result files."""
    variants = ["--schemes", "normal", "--variant", "xavier:init_scheme=xavier"]
    assert compare_init.main(compare_argv(tmp_path, *variants)) == 0
    assert compare_init.main(compare_argv(tmp_path, *variants, "--seeds", "1", "--learning_rate", "3e-3")) == 0
    out = tmp_path / "bench"
    runs = out / "runs"

    def loss(variant, rate, seed):
        return json.loads((runs / f"1L-{variant}{rate}-seed{seed}" / "all_results.json").read_text())["eval_loss"]

    def expected(variant):
        seed0 = {1e-3: loss(variant, "", 0), 3e-3: loss(variant, "-lr0.003", 0)}
        best = min(seed0, key=seed0.get)
        return best, ([loss(variant, "", 0), loss(variant, "", 1)] if best == 1e-3 else [seed0[3e-3]])

    assert grid_report.main([str(out), "--reference", "normal"]) == 0
    rows = {row["variant"]: row for row in json.loads((out / "grid_report.json").read_text())["rows"]}
    reference_rate, reference = expected("normal")
    for variant in ("normal", "xavier"):
        rate, losses = expected(variant)
        row = rows[variant]
        assert (row["layers"], row["best_learning_rate"], row["best_seeds"]) == (1, rate, list(range(len(losses))))
        assert row["best_eval_loss_mean"] == pytest.approx(sum(losses) / len(losses))
        paired = [losses[seed] - reference[seed] for seed in range(min(len(losses), len(reference)))]
        assert row["delta_vs_reference_mean"] == pytest.approx(sum(paired) / len(paired))
        assert row["eval_loss"]["0.001"] == {"0": loss(variant, "", 0), "1": loss(variant, "", 1)}
    assert rows["normal"]["delta_vs_reference_mean"] == 0.0
    markdown = (out / "grid_report.md").read_text()
    assert "| lr 0.001 | lr 0.003 |" in markdown and "## At each variant's best rate" in markdown
    assert (out / "grid_report_depth.png").stat().st_size > 0

    # a NaN loss counts as the worst, so the other rate becomes the best
    worse = "" if reference_rate == 1e-3 else "-lr0.003"
    results = runs / f"1L-normal{worse}-seed0" / "all_results.json"
    results.write_text(json.dumps({**json.loads(results.read_text()), "eval_loss": float("nan")}))
    assert grid_report.main([str(out)]) == 0
    rows = {row["variant"]: row for row in json.loads((out / "grid_report.json").read_text())["rows"]}
    assert rows["normal"]["best_learning_rate"] != reference_rate
    capsys.readouterr()

    # refused in one line, before anything is written: no such reference; a run of another recipe in the folder
    for path in out.glob("grid_report*"):
        path.unlink()
    assert grid_report.main([str(out), "--reference", "kaiming"]) == 2
    assert "--reference 'kaiming' has no finished run" in capsys.readouterr().err
    assert compare_init.main(compare_argv(tmp_path, "--schemes", "normal", "--seeds", "1", "--learning_rate", "5e-3",
                                          "--max_train_steps", "4")) == 0
    capsys.readouterr()
    assert grid_report.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differ in max_train_steps" in err and "1L-normal-lr0.005-seed0 has 4" in err
    assert not list(out.glob("grid_report*"))


def test_grid_report_refuses_a_folder_without_compare_init_runs(tmp_path, capsys):
    assert grid_report.main([str(tmp_path)]) == 2
    assert "has no runs/ folder: not a compare-init --output_dir" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    assert grid_report.main([str(tmp_path)]) == 2
    assert "holds no finished run" in capsys.readouterr().err
    stray = tmp_path / "runs" / "something-else"
    stray.mkdir()
    (stray / "all_results.json").write_text('{"eval_loss": 2.0}')
    (stray / "training_args.json").write_text('{"config_overrides": "num_hidden_layers=2", "learning_rate": 0.001, "seed": 0}')
    assert grid_report.main([str(tmp_path)]) == 2
    assert "is not a compare-init run (its name does not match" in capsys.readouterr().err
    (stray / "training_args.json").write_text('{"learning_rate": 0.001, "seed": 0}')
    assert grid_report.main([str(tmp_path)]) == 2
    assert "is not a compare-init run (its training_args.json lacks the layer count" in capsys.readouterr().err
    # a run whose result file is cut short (a disk that filled up) is named with its file
    run = tmp_path / "runs" / compare_init.run_name(2, "normal", 1e-3, 0)
    stray.rename(run)
    (run / "training_args.json").write_text('{"config_overrides": "num_hidden_layers=2", "learning_rate": 0.001, '
                                            '"seed": 0}')
    assert grid_report.main([str(tmp_path)]) == 0
    (run / "all_results.json").write_text('{"eval_loss": 2.')
    assert grid_report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run / 'all_results.json'} is not a readable JSON file" in err
    (run / "all_results.json").write_text('{"train_loss": 2.0}')
    assert grid_report.main([str(tmp_path)]) == 2
    assert "has no numeric eval_loss" in capsys.readouterr().err


def test_grid_report_best_rate_is_chosen_paired_by_seed():
    # seed 1 only at 2e-3 is luckier than seed 0 anywhere: the choice rests on seed 0, where 1e-3 is better
    assert grid_report.best_rate({1e-3: {0: 2.0}, 2e-3: {0: 2.1, 1: 1.5}}) == 1e-3
    assert grid_report.best_rate({1e-3: {0: 2.0, 1: 2.0}, 2e-3: {0: 2.1, 1: 1.5}}) == 2e-3
    assert grid_report.best_rate({1e-3: {0: float("nan")}, 2e-3: {0: 9.0}}) == 2e-3
    assert grid_report.best_rate({1e-3: {0: 2.0}, 2e-3: {1: 1.9}}) == 2e-3  # no shared seed: each rate's own
    # a poor rate run with seed 0 alone does not reduce the choice between the others to seed 0
    assert grid_report.best_rate({5e-4: {0: 2.68}, 2e-3: {0: 2.17, 1: 2.19}, 4e-3: {0: 2.18, 1: 2.13}}) == 4e-3
