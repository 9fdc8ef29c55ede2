"""Auxiliary-loss-free balancing (DeepSeek-V3 report §2.1.2): the router's bias chooses experts, never weights them,
moves by ±γ toward even load once per optimizer step, is saved with the weights, and changes nothing while zero."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, reset_accelerate_state, tiny_config, tiny_moe_config
from safetensors.torch import load_file, save_file

from acx_ramanujan import RamanujanByteTokenizer, RamanujanConfig, RamanujanForCausalLM, export
from acx_ramanujan import modeling_ramanujan
from acx_ramanujan.modeling_ramanujan import RamanujanSparseMoeBlock, expert_load, load_balancing_loss, router_biases
from acx_ramanujan.training import pretrain
from test_pretraining import MOE

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
BIAS_KEY = "model.layers.{}.mlp.e_score_correction_bias"


def build(seed=0, **overrides) -> RamanujanForCausalLM:
    torch.manual_seed(seed)
    return RamanujanForCausalLM(tiny_moe_config(**overrides))


def blocks(model) -> list[RamanujanSparseMoeBlock]:
    return [module for module in model.modules() if isinstance(module, RamanujanSparseMoeBlock)]


def random_ids(batch=3, length=11, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def plain_topk(block, probs):
    """The routing before the bias existed: the top k of the probabilities, weighted by them."""
    return torch.topk(probs, block.top_k, dim=-1)


def forward_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    return out, grads


# --- routing ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.01])
def test_a_zero_bias_routes_bit_for_bit_as_plain_topk(rate, monkeypatch):
    """With the bias zero (always so at rate 0) logits, losses and every gradient equal the plain top-k model's."""
    ids = random_ids()
    model = build(router_bias_update_rate=rate, num_shared_experts=1).train()
    new, new_grads = forward_and_grads(model, ids)
    monkeypatch.setattr(RamanujanSparseMoeBlock, "select", plain_topk)
    monkeypatch.setattr(modeling_ramanujan, "router_biases", lambda model: None)
    old, old_grads = forward_and_grads(model, ids)
    for name in ("logits", "loss", "aux_loss", "z_loss"):
        assert torch.equal(getattr(new, name), getattr(old, name)), name
    for name in new_grads:
        assert torch.equal(new_grads[name], old_grads[name]), name


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_the_bias_chooses_the_experts_and_the_probabilities_weight_them(norm_topk_prob):
    """Each token against a per-token loop: top k of probs + bias, outputs weighted by the unbiased probs."""
    model = build(norm_topk_prob=norm_topk_prob).eval()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.router.weight.normal_(0, 0.5)
        block.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    hidden = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        actual = block(hidden).reshape(-1, 32)
        probs = F.softmax(block.router(hidden.reshape(-1, 32)).float(), dim=-1)
    bias, experts, k = block.e_score_correction_bias, block.experts, block.top_k
    differs = 0
    for token, (x, p) in enumerate(zip(hidden.reshape(-1, 32), probs)):
        scores = (p + bias).tolist()
        chosen = sorted(range(4), key=lambda e: -scores[e])[:k]
        differs += set(chosen) != set(p.topk(k).indices.tolist())
        weights = p[chosen] / p[chosen].sum() if norm_topk_prob else p[chosen]
        expected = torch.zeros(32)
        for expert, weight in zip(chosen, weights):
            gate, up = (experts.gate_up_proj[expert] @ x).chunk(2)
            expected += weight * (experts.down_proj[expert] @ (F.silu(gate) * up))
        torch.testing.assert_close(actual[token], expected.detach(), rtol=1e-5, atol=1e-6)
    assert differs > 0, "the bias changed no token's choice: the test would not see it ignored"


def test_losses_and_expert_load_count_the_biased_choice():
    """f_e of the balance loss and the reported expert load follow the choice the model made (with the bias)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 4)
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])  # expert 3 overtakes expert 1 in every token
    assert expert_load((logits,), 2).tolist() == [[0.5, 0.5, 0.0, 0.0]]
    assert expert_load((logits,), 2, (bias,)).tolist() == [[0.5, 0.0, 0.0, 0.5]]
    probs = F.softmax(logits, dim=-1)[0]
    expected = 4 * (probs[0] + probs[3]).item()  # E · Σ_e f_e P_e with f = (1, 0, 0, 1) assignments per token
    assert load_balancing_loss((logits,), 2, biases=(bias,)).item() == pytest.approx(expected)
    model = build().eval()
    assert [tuple(b.shape) for b in router_biases(model)] == [(4,), (4,)]  # one per MoE layer, in layer order


# --- counting and the update ---------------------------------------------------------------------------------------


def test_training_forwards_count_the_biased_choices_and_others_do_not():
    model = build(router_bias_update_rate=0.01)
    for block in blocks(model):
        with torch.no_grad():
            block.e_score_correction_bias.copy_(torch.tensor([0.0, 0.05, -0.05, 0.1]))
    ids = random_ids()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    assert all(block.assignment_counts is None for block in blocks(model))  # evaluation: not counted
    model.train()
    model(input_ids=ids)
    model(input_ids=ids)
    for block, layer_logits in zip(blocks(model), logits):
        scores = F.softmax(layer_logits, dim=-1) + block.e_score_correction_bias
        naive = torch.zeros(4, dtype=torch.long)
        for token_scores in scores:
            for expert in sorted(range(4), key=lambda e: -token_scores[e].item())[:2]:
                naive[expert] += 2  # two identical forwards
        assert torch.equal(block.assignment_counts, naive)
    off = build(router_bias_update_rate=0.0).train()
    off(input_ids=ids)
    assert all(block.assignment_counts is None for block in blocks(off))  # rate 0: nothing counted


@pytest.mark.parametrize("counts, signs", [
    ([5, 1, 3, 3], [-1, 1, 0, 0]),  # mean 3: the busiest pushed down, the idlest up, those at the mean unmoved
    ([4, 1, 2, 0], [-1, 1, -1, 1]),  # mean 1.75
    ([2, 2, 2, 2], [0, 0, 0, 0]),  # balanced: nothing moves
])
def test_update_is_gamma_times_the_sign_of_mean_minus_load(counts, signs):
    rate = 0.01
    model = build(router_bias_update_rate=rate)
    first, second = blocks(model)
    start = torch.tensor([0.1, 0.0, -0.02, 0.0])
    with torch.no_grad():
        first.e_score_correction_bias.copy_(start)
    first.assignment_counts = torch.tensor(counts)
    second.assignment_counts = torch.tensor([0, 0, 0, 8])  # the other layer: its own counts
    model.update_router_biases()
    expected = [s + rate * sign for s, sign in zip(start.tolist(), signs)]
    assert first.e_score_correction_bias.tolist() == pytest.approx(expected, abs=1e-8)
    assert second.e_score_correction_bias.tolist() == pytest.approx([rate, rate, rate, -rate], abs=1e-8)
    assert first.assignment_counts is None and second.assignment_counts is None  # counting starts afresh
    model.update_router_biases()  # no forward since: nothing moves
    assert first.e_score_correction_bias.tolist() == pytest.approx(expected, abs=1e-8)


def test_rate_zero_never_moves_the_bias_and_the_bias_takes_no_gradient():
    model = build(router_bias_update_rate=0.0).train()
    ids = random_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for block in blocks(model):
        block.assignment_counts = torch.tensor([9, 0, 0, 0])
    model.update_router_biases()
    assert all(not block.e_score_correction_bias.any() for block in blocks(model))
    assert "e_score_correction_bias" not in " ".join(name for name, _ in model.named_parameters())


def test_gradient_checkpointing_recompute_leaves_the_update_unchanged():
    """The recompute counts a layer's choices a second time; the signs, and so the biases, come out the same."""
    biases, first_counts = [], []
    for checkpointing in (False, True):
        model = build(router_bias_update_rate=0.01).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(3):
            ids = random_ids(seed=step)
            model(input_ids=ids, labels=ids).loss.backward()
            if step == 0:
                first_counts.append(torch.stack([block.assignment_counts for block in blocks(model)]))
            optimizer.step()
            optimizer.zero_grad()
            model.update_router_biases()
        biases.append(torch.stack(router_biases(model)))
    assert torch.equal(first_counts[1], 2 * first_counts[0])  # the recompute did count again
    assert biases[0].any() and torch.equal(biases[0], biases[1])


# --- saved state -----------------------------------------------------------------------------------------------------


def test_a_fresh_model_has_zero_bias_and_a_saved_one_keeps_it(tmp_path):
    model = build(router_bias_update_rate=0.001)
    assert all(not bias.any() and bias.dtype == torch.float32 for bias in router_biases(model))
    with torch.no_grad():
        for layer, bias in enumerate(router_biases(model)):
            bias.copy_(torch.tensor([0.003, -0.001, 0.0, 0.002]) * (layer + 1))
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved[BIAS_KEY.format(1)].tolist() == pytest.approx([0.006, -0.002, 0.0, 0.004])
    for dtype in (torch.float32, torch.bfloat16):
        reloaded = RamanujanForCausalLM.from_pretrained(tmp_path / "saved", dtype=dtype)
        for expected, actual in zip(router_biases(model), router_biases(reloaded)):
            assert actual.dtype == torch.float32 and torch.equal(actual, expected)  # kept in float32, as DeepSeek-V3's
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(RamanujanForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits,
                                   model.eval()(ids).logits, rtol=0, atol=0)


def test_a_checkpoint_saved_before_the_bias_loads_with_zero_bias_and_no_missing_keys(tmp_path):
    build().save_pretrained(tmp_path / "old")
    weights = tmp_path / "old" / "model.safetensors"
    tensors = {name: tensor for name, tensor in load_file(weights).items() if "e_score_correction_bias" not in name}
    save_file(tensors, weights, metadata={"format": "pt"})
    model, info = RamanujanForCausalLM.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert all(not bias.any() for bias in router_biases(model))
    from acx_ramanujan.hub import check_weights

    check_weights(tmp_path / "old", model.config)  # `acx-rt push` takes it too


def test_a_biased_model_exports_as_ernie_which_routes_the_same_way(tmp_path):
    """Mixtral has no selection bias; ERNIE 4.5 MoE has (`export` itself compares the logits and greedy tokens)."""
    model = build().eval()
    with torch.no_grad():
        for bias in router_biases(model):
            bias.copy_(torch.tensor([0.02, -0.01, 0.0, 0.03]))
    checkpoint, output = tmp_path / "checkpoint", tmp_path / "llama"
    model.save_pretrained(checkpoint)
    RamanujanByteTokenizer().save_pretrained(checkpoint)
    assert export.main(["--checkpoint", str(checkpoint), "--format", "llama", "--output_dir", str(output)]) == 0
    assert json.loads((output / "config.json").read_text())["architectures"] == ["Ernie4_5_MoeForCausalLM"]
    exported = load_file(output / "model.safetensors")  # under ERNIE's original checkpoint name
    assert exported["model.layers.1.mlp.moe_statics.e_score_correction_bias"].tolist() == [
        pytest.approx([0.02, -0.01, 0.0, 0.03])]


# --- config ----------------------------------------------------------------------------------------------------------


def test_the_rate_is_a_non_negative_moe_only_field():
    assert RamanujanConfig(num_experts=4).router_bias_update_rate == 0.0
    assert RamanujanConfig(num_experts=4, router_bias_update_rate=0.001).to_dict()["router_bias_update_rate"] == 0.001
    assert RamanujanConfig.parse_overrides("router_bias_update_rate=0.001") == {"router_bias_update_rate": 0.001}
    for bad in (-0.001, float("nan"), float("inf"), "0.001"):
        with pytest.raises(ValueError, match="router_bias_update_rate"):
            RamanujanConfig(num_experts=4, router_bias_update_rate=bad)
    with pytest.raises(ValueError, match="router_bias_update_rate applies to mixture-of-experts models only"):
        RamanujanConfig(router_bias_update_rate=0.001)
    assert not hasattr(RamanujanConfig(), "router_bias_update_rate")
    assert not hasattr(RamanujanConfig(router_bias_update_rate=0.0), "router_bias_update_rate")  # the default: accepted


# --- training --------------------------------------------------------------------------------------------------------


def imbalance_of_late_evaluations(output_dir: Path) -> float:
    """Mean over the last 4 evaluations of the largest |expert share − 1/E| of any layer."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    loads = [torch.tensor(record["expert_load"]) for record in records if "expert_load" in record][-4:]
    return sum((load - 0.25).abs().max().item() for load in loads) / len(loads)


def test_training_with_the_rate_moves_the_bias_and_evens_the_load(tmp_path, corpus):
    """Without any balance loss this tiny MoE collapses onto some experts within 120 steps; the bias prevents it."""
    imbalance = {}
    for rate in (0.0, 0.005):
        output = tmp_path / f"rate-{rate}"
        pretrain.pretrain(pretrain.training_arguments(
            train_file=[str(corpus)], config_overrides=f"{MOE},router_aux_loss_coef=0,router_bias_update_rate={rate}",
            block_size=32, per_device_train_batch_size=4, learning_rate=3e-3, max_train_steps=120, eval_steps=10,
            output_dir=str(output)))
        reset_accelerate_state()
        imbalance[rate] = imbalance_of_late_evaluations(output)
        saved = load_file(output / "model.safetensors")
        biases = torch.stack([saved[BIAS_KEY.format(layer)] for layer in range(2)])
        assert biases.any() == (rate > 0)
        steps = biases / rate if rate else biases
        assert torch.allclose(steps, steps.round(), atol=1e-3)  # whole multiples of γ
    assert imbalance[0.0] > 0.2, imbalance  # collapsed: the scenario the bias is for
    assert imbalance[0.005] < 0.6 * imbalance[0.0], imbalance


def test_exact_resume_keeps_the_bias(tmp_path, corpus):
    """The bias is model state: saved in every checkpoint; the counts are empty at every step boundary."""
    common = ["--train_file", str(corpus), "--config_overrides", f"{MOE},router_bias_update_rate=0.01",
              "--block_size", "32", "--per_device_train_batch_size", "4", "--max_train_steps", "8",
              "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4"]
    assert pretrain.main([*common, "--output_dir", str(tmp_path / "full")]) == 0
    reset_accelerate_state()
    resume = ["--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-4")]
    assert pretrain.main([*common, *resume, "--output_dir", str(tmp_path / "resumed")]) == 0
    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "resumed"))
    assert full[BIAS_KEY.format(0)].any()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_a_checkpoint_saved_before_the_bias_resumes_exactly_and_nothing_else_may_be_missing(tmp_path, corpus, capsys):
    """A run checkpointed by a version without the bias (its weights file lacks it) resumes as if uninterrupted
    (the bias stays zero: the rate is 0 there); a checkpoint lacking any other weight is still refused in one line."""
    common = ["--train_file", str(corpus), "--config_overrides", MOE, "--block_size", "32",
              "--per_device_train_batch_size", "4", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    assert pretrain.main([*common, "--output_dir", str(tmp_path / "full")]) == 0
    for name, dropped in (("old", "e_score_correction_bias"), ("damaged", "layers.1.mlp.router.weight")):
        copy = shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / name)
        kept = {key: value for key, value in load_file(copy / "model.safetensors").items() if dropped not in key}
        save_file(kept, copy / "model.safetensors", metadata={"format": "pt"})
    reset_accelerate_state()
    resume = ["--resume_from_checkpoint", str(tmp_path / "old")]
    assert pretrain.main([*common, *resume, "--output_dir", str(tmp_path / "resumed")]) == 0
    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "resumed"))
    assert full.keys() == resumed.keys() and BIAS_KEY.format(0) in resumed
    for name in full:
        assert torch.equal(full[name], resumed[name]), name

    reset_accelerate_state()
    resume = ["--resume_from_checkpoint", str(tmp_path / "damaged")]
    assert pretrain.main([*common, *resume, "--output_dir", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("damaged: model.safetensors lacks model.layers.1.mlp.router.weight"), error


def test_fsdp2_shards_trains_and_resumes_the_bias_exactly(tmp_path, corpus):
    """With the shipped fsdp.yaml (FSDP2, cpu_ram_efficient_loading) the bias passes `prepare`, moves, is saved in
    the sharded checkpoints and comes back bit-exactly on resume."""
    from test_fsdp import CONFIGS, launch

    common = ["--train_file", str(corpus), "--config_overrides", f"{MOE},router_bias_update_rate=0.01",
              "--block_size", "32", "--per_device_train_batch_size", "2", "--max_train_steps", "4",
              "--checkpointing_steps", "2", "--optimizer", "adamw"]
    launch(CONFIGS / "fsdp.yaml", [*common, "--output_dir", str(tmp_path / "full")])
    resume = ["--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-2")]
    result = launch(CONFIGS / "fsdp.yaml", [*common, *resume, "--output_dir", str(tmp_path / "resumed")])
    assert "Resumed from" in result.stdout
    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "resumed"))
    assert torch.stack([full[BIAS_KEY.format(layer)] for layer in range(2)]).any()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


# Runs in each of two processes: one gloo group, each process with its own counts, then one update.
RANK = """
import json, sys, torch, torch.distributed as dist
from acx_ramanujan import RamanujanConfig, RamanujanForCausalLM
from acx_ramanujan.modeling_ramanujan import RamanujanSparseMoeBlock, router_biases
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
config = RamanujanConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_experts=4, router_bias_update_rate=0.01)
model = RamanujanForCausalLM(config)
counts = [[5, 0, 0, 1], [0, 4, 1, 1]][rank]
for layer, block in enumerate(m for m in model.modules() if isinstance(m, RamanujanSparseMoeBlock)):
    block.assignment_counts = torch.tensor(counts[::-1] if layer else counts)
model.update_router_biases()
print(json.dumps([bias.tolist() for bias in router_biases(model)]))
dist.destroy_process_group()
"""


def test_processes_sum_their_counts_and_keep_identical_biases():
    """Under torch.distributed the update reads the counts summed over processes: each process alone would push
    experts its own way (rank 0: [-, +, +, +]; rank 1: [+, -, +, +]), together they push [-, -, +, +]."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = []
    try:
        for process in ranks:
            stdout, stderr = process.communicate(timeout=180)
            assert process.returncode == 0, stderr[-3000:]
            outputs.append(json.loads(stdout.splitlines()[-1]))
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    expected = [[-0.01, -0.01, 0.01, 0.01], [0.01, 0.01, -0.01, -0.01]]  # layer 1 had the counts reversed
    for biases in outputs:
        assert [pytest.approx(row, abs=1e-8) for row in expected] == biases


def test_finetuning_updates_the_bias_after_each_step(tmp_path, text_corpus):
    from acx_ramanujan.training.causal_lm import main as finetune

    checkpoint = tmp_path / "checkpoint"
    build(router_bias_update_rate=0.01).save_pretrained(checkpoint)
    RamanujanByteTokenizer().save_pretrained(checkpoint)
    text = tmp_path / "corpus.txt"
    text.write_text(text_corpus.read_text()[:6000])
    output = tmp_path / "out"
    assert finetune(["--model_name_or_path", str(checkpoint), "--train_file", str(text), "--block_size", "32",
                     "--max_steps", "3", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                     "--output_dir", str(output), "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
                     "--seed", "0"]) == 0
    biases = torch.stack([load_file(output / "model.safetensors")[BIAS_KEY.format(layer)] for layer in range(2)])
    assert biases.any() and biases.abs().max().item() <= 3 * 0.01 + 1e-6  # at most one step of γ per optimizer step
    assert torch.allclose(biases / 0.01, (biases / 0.01).round(), atol=1e-3)


def test_gguf_export_refuses_a_biased_model(tmp_path, capsys):
    """llama.cpp's llama architecture has no selection bias: refused by name (export --format llama keeps it)."""
    pytest.importorskip("gguf")
    model = build()
    with torch.no_grad():
        router_biases(model)[0].copy_(torch.tensor([0.01, 0.0, 0.0, -0.01]))
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    RamanujanByteTokenizer().save_pretrained(checkpoint)
    output = tmp_path / "gguf"
    assert export.main(["--checkpoint", str(checkpoint), "--format", "gguf", "--output_dir", str(output)]) == 2
    assert "a nonzero router balancing bias" in capsys.readouterr().err.strip().splitlines()[-1]


def test_peft_all_linear_wraps_the_router_and_the_bias_still_routes():
    """PEFT's "all-linear" wraps the router (an nn.Linear); the bias, on the MoE block, keeps choosing and moving."""
    from peft import LoraConfig, get_peft_model

    model = build(router_bias_update_rate=0.01)
    with torch.no_grad():
        for bias in router_biases(model):
            bias.copy_(torch.tensor([0.02, -0.01, 0.0, 0.03]))
    ids = random_ids()
    with torch.no_grad():
        expected = model.eval()(ids).logits
    wrapped = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4))
    assert type(blocks(wrapped)[0].router).__name__ != "RamanujanRouter"
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(ids).logits, expected)  # LoRA's B starts at zero
    wrapped.train()(input_ids=ids)
    modeling_ramanujan.update_router_biases(wrapped)
    assert not torch.equal(torch.stack(router_biases(wrapped)), torch.tensor([[0.02, -0.01, 0.0, 0.03]] * 2))
