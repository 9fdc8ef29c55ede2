"""`acx-rt export --format llama`: the checkpoint loads as LlamaForCausalLM / MixtralForCausalLM / Ernie4_5_MoeForCausalLM /
Qwen3ForCausalLM / Qwen3MoeForCausalLM in a process that cannot import our package (no remote code), and gives our logits
and greedy tokens; its tokenizer is ours."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import export_llama, random_model, run_without_package, tiny_config, tiny_moe_config
from safetensors.torch import load_file

from acx_ramanujan import RamanujanByteTokenizer, RamanujanForCausalLM, export
from acx_ramanujan.modeling_ramanujan import router_biases
from acx_ramanujan.training.bpe import train_bpe_tokenizer
from acx_ramanujan.export.llama import byte_tokenizer_fast

TEXTS = ["Hello, world!", "Ramanujan ∑ 1729 — é 漢字 😀", "  two spaces\tand a tab\n", "a</s>b<s>c<pad>", "the cat sat"]
NEW_TOKENS = 6

# Runs in the child: load with Transformers' own classes, write logits, greedy tokens and tokenizations.
CHILD = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, inputs = {directory!r}, json.loads({inputs!r})
model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(directory)
ids, mask = torch.tensor(inputs["ids"]), torch.tensor(inputs["mask"])
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens={new_tokens}, do_sample=False)
save_file({{"logits": logits, "greedy": greedy}}, {directory!r} + "/../child.safetensors")
encoded = [tokenizer(text).input_ids for text in inputs["texts"]]
decoded = [tokenizer.decode(row) for row in encoded]
print(json.dumps({{"class": type(model).__name__, "tokenizer": type(tokenizer).__name__, "encoded": encoded,
                  "decoded": decoded, "specials": tokenizer.decode([256, 257, 258, 65])}}))
"""


def export_and_load_elsewhere(tmp_path, config, tokenizer=None, seed=0):
    """Export a random model of `config`; load the export in a package-free process. Returns (model, child's results)."""
    model = random_model(config, seed).eval()
    checkpoint, output_dir = export_llama(tmp_path, model, tokenizer)

    input_ids, attention_mask = export.random_batch(config, 3, 19, torch.Generator().manual_seed(4))  # left-padded
    inputs = json.dumps({"ids": input_ids.tolist(), "mask": attention_mask.tolist(), "texts": TEXTS})
    code = CHILD.format(directory=str(output_dir), inputs=inputs, new_tokens=NEW_TOKENS)
    child = json.loads(run_without_package(code, cwd=tmp_path).stdout.splitlines()[-1])
    returned = load_file(tmp_path / "child.safetensors")

    # Ours: eager attention, and greedy tokens without a cache (recomputing every step), to be independent.
    reference = RamanujanForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        greedy = reference.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False
        )
    child["logit_difference"] = (returned["logits"] - expected)[attention_mask.bool()].abs().max().item()
    child["same_greedy"] = torch.equal(returned["greedy"], greedy)
    child["output_dir"] = output_dir
    return model, child


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("dense_gqa_untied_alpha", dict(attention_scale_alpha=0.3, attention_scale_decay=0.2)),
        ("tied_llama3_rope_head_dim", dict(
            tie_word_embeddings=True, attention_scale_alpha=0.8, head_dim=16, num_key_value_heads=1,
            rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        )),
        ("moe_as_mixtral", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, attention_scale_alpha=0.5)),
        ("moe_shared_and_dense_as_ernie", dict(
            num_experts=4, num_shared_experts=2, first_k_dense_layers=1, num_hidden_layers=3, attention_scale_alpha=0.5,
        )),
        # the depth schemes fold into o_proj / down_proj (experts and shared experts too) and the norm weights
        ("dense_completep_layernorm_scaling", dict(
            num_hidden_layers=3, depth_parametrization="completep", depth_base_layers=1, layernorm_scaling=True,
            init_scheme="ramanujan",
        )),
        ("moe_depth_mup_as_mixtral", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                          depth_parametrization="depth_mup", depth_base_layers=1)),
        ("moe_shared_completep_as_ernie", dict(
            num_experts=4, num_shared_experts=1, first_k_dense_layers=1, num_hidden_layers=3,
            depth_parametrization="completep", depth_base_layers=2, layernorm_scaling=True,
        )),
        ("qk_norm_as_qwen3", dict(qk_norm=True, attention_scale_alpha=0.3, attention_scale_decay=0.2)),
        ("qk_norm_tied_mqa_as_qwen3", dict(qk_norm=True, tie_word_embeddings=True, head_dim=16, num_key_value_heads=1,
                                           attention_scale_alpha=0.8)),
        ("qk_norm_moe_as_qwen3_moe", dict(
            num_experts=4, qk_norm=True, first_k_dense_layers=1, num_hidden_layers=3, attention_scale_alpha=0.5,
        )),
        ("qk_norm_moe_unnormalized_as_qwen3_moe", dict(num_experts=4, qk_norm=True, norm_topk_prob=False)),
        ("qk_norm_completep_layernorm_scaling_as_qwen3", dict(  # the depth folds and the q_norm fold together
            qk_norm=True, num_hidden_layers=3, depth_parametrization="completep", depth_base_layers=1,
            layernorm_scaling=True, attention_scale_alpha=0.3,
        )),
    ],
)
def test_loads_as_a_transformers_class_without_our_package(tmp_path, name, overrides):
    config = tiny_moe_config(**overrides) if "num_experts" in overrides else tiny_config(**overrides)
    _, child = export_and_load_elsewhere(tmp_path, config)
    expected_class = {"moe_as_mixtral": "MixtralForCausalLM", "moe_shared_and_dense_as_ernie": "Ernie4_5_MoeForCausalLM",
                      "moe_depth_mup_as_mixtral": "MixtralForCausalLM", "moe_shared_completep_as_ernie": "Ernie4_5_MoeForCausalLM",
                      "qk_norm_as_qwen3": "Qwen3ForCausalLM", "qk_norm_tied_mqa_as_qwen3": "Qwen3ForCausalLM",
                      "qk_norm_moe_as_qwen3_moe": "Qwen3MoeForCausalLM",
                      "qk_norm_moe_unnormalized_as_qwen3_moe": "Qwen3MoeForCausalLM",
                      "qk_norm_completep_layernorm_scaling_as_qwen3": "Qwen3ForCausalLM"}
    assert child["class"] == expected_class.get(name, "LlamaForCausalLM")
    assert child["logit_difference"] < 1e-5
    assert child["same_greedy"]

    written = json.loads((child["output_dir"] / "config.json").read_text())
    assert written["architectures"] == [child["class"]] and "auto_map" not in written
    assert not list(child["output_dir"].glob("*.py"))
    assert (child["output_dir"] / "README.md").read_text().startswith("---\n")


def exported_weights(tmp_path, config):
    """(our weights, the exported model.safetensors, the child's results) of `export_and_load_elsewhere`."""
    model, child = export_and_load_elsewhere(tmp_path, config)
    return model.state_dict(), load_file(child["output_dir"] / "model.safetensors"), child


def temperature_factor(layer, alpha, decay):
    """The seed's attention temperature over the standard scale in layer `layer`: 1/(1 + α·e^(−λ·l))."""
    return 1 / (1 + alpha * torch.exp(torch.tensor(-decay * layer)))


def test_attention_temperature_is_folded_into_q_proj(tmp_path):
    """With α ≠ 0 the exported q_proj is ours times 1/(1 + α·e^(−λ·l)) in layer l, k_proj unchanged."""
    config = tiny_config(attention_scale_alpha=0.3, attention_scale_decay=0.5)
    ours, weights, _ = exported_weights(tmp_path, config)
    for layer in range(config.num_hidden_layers):
        factor = temperature_factor(layer, alpha=0.3, decay=0.5)
        name = f"model.layers.{layer}.self_attn."
        torch.testing.assert_close(weights[name + "q_proj.weight"], ours[name + "q_proj.weight"] * factor)
        assert torch.equal(weights[name + "k_proj.weight"], ours[name + "k_proj.weight"])


def test_branch_multiplier_and_layernorm_scaling_are_folded_into_the_weights(tmp_path):
    """CompleteP at L/L0 = 3: o_proj and down_proj × 1/3; LayerNorm Scaling: layer l's two norm weights × 1/√(l+1)."""
    config = tiny_config(num_hidden_layers=3, depth_parametrization="completep", depth_base_layers=1, layernorm_scaling=True)
    ours, weights, child = exported_weights(tmp_path, config)
    for layer in range(3):
        name = f"model.layers.{layer}."
        for projection in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            torch.testing.assert_close(weights[name + projection], ours[name + projection] / 3)
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            torch.testing.assert_close(weights[name + norm], ours[name + norm] / (layer + 1) ** 0.5)
        for unchanged in ("self_attn.v_proj.weight", "mlp.up_proj.weight"):
            assert torch.equal(weights[name + unchanged], ours[name + unchanged])
    assert torch.equal(weights["model.norm.weight"], ours["model.norm.weight"])
    assert "folded the same way" in (child["output_dir"] / "README.md").read_text()


def test_attention_temperature_is_folded_into_q_norm_with_qk_norm(tmp_path):
    """With qk_norm, q is normalized after q_proj (a factor there would cancel): the exported q_norm weight is ours times
    1/(1 + α·e^(−λ·l)) in layer l; q_proj, k_proj and k_norm unchanged. The config is Qwen3's plain attention."""
    config = tiny_moe_config(qk_norm=True, attention_scale_alpha=0.3, attention_scale_decay=0.5, first_k_dense_layers=1)
    ours, weights, child = exported_weights(tmp_path, config)
    for layer in range(config.num_hidden_layers):
        factor = temperature_factor(layer, alpha=0.3, decay=0.5)
        name = f"model.layers.{layer}.self_attn."
        torch.testing.assert_close(weights[name + "q_norm.weight"], ours[name + "q_norm.weight"] * factor)
        for unchanged in ("q_proj.weight", "k_proj.weight", "k_norm.weight"):
            assert torch.equal(weights[name + unchanged], ours[name + unchanged])
    written = json.loads((child["output_dir"] / "config.json").read_text())
    assert (written["mlp_only_layers"], written["decoder_sparse_step"], written["head_dim"]) == ([0], 1, config.head_dim)
    assert (written["attention_bias"], written["use_sliding_window"], written["sliding_window"]) == (False, False, None)
    assert "Qwen3MoeForCausalLM" in (child["output_dir"] / "README.md").read_text()
    assert "`q_norm` weights" in (child["output_dir"] / "README.md").read_text()


def test_byte_tokenizer_survives_as_a_fast_tokenizer(tmp_path):
    _, child = export_and_load_elsewhere(tmp_path, tiny_config())
    ours = RamanujanByteTokenizer()
    assert child["tokenizer"] in ("TokenizersBackend", "PreTrainedTokenizerFast")
    # The exported tokenizer parses special-token text, as Llama's do: ours does the same with split_special_tokens=False.
    assert child["encoded"] == [ours(text, split_special_tokens=False).input_ids for text in TEXTS]
    assert child["encoded"][3] == [257, 97, 258, 98, 257, 99, 256]
    assert child["decoded"] == [ours.decode(row) for row in child["encoded"]]
    assert child["specials"] == ours.decode([256, 257, 258, 65]) == "<pad><s></s>A"
    chat = [{"role": "user", "content": "hi"}]
    fast, settings = byte_tokenizer_fast(), dict(add_generation_prompt=True, return_dict=True)
    assert fast.apply_chat_template(chat, **settings)["input_ids"] == ours.apply_chat_template(chat, **settings)["input_ids"]


def test_trained_bpe_tokenizer_is_carried_over(tmp_path):
    texts = ["the cat sat on the mat " * 20, "the dog sat on the log " * 20]
    tokenizer = train_bpe_tokenizer(iter(texts), vocab_size=300)
    config = tiny_config(vocab_size=len(tokenizer))
    _, child = export_and_load_elsewhere(tmp_path, config, tokenizer=tokenizer)
    assert child["encoded"] == [tokenizer(text).input_ids for text in TEXTS]
    assert max(child["encoded"][-1]) >= 259, "the merges were not used"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(norm_topk_prob=False), "norm_topk_prob=False has no exact in-library equivalent"),
        (dict(norm_topk_prob=False, num_shared_experts=1), "norm_topk_prob=False has no exact in-library equivalent"),
        (dict(deepnorm=True, init_scheme="deepnorm"), "deepnorm=True (post-norm layers, x ← norm(α·x + f(x))) has no "
                                                      "Llama, Mixtral, ERNIE or Qwen3 equivalent"),
        (dict(num_experts=0, deepnorm=True), "deepnorm=True (post-norm layers"),
        (dict(num_experts=0, deepnorm=True, qk_norm=True), "deepnorm=True (post-norm layers"),
    ],
)
def test_models_without_an_exact_transformers_class_are_refused(tmp_path, capsys, overrides, field):
    checkpoint = tmp_path / "checkpoint"
    RamanujanForCausalLM(tiny_moe_config(**overrides)).save_pretrained(checkpoint)
    output_dir = tmp_path / "llama"
    assert export.main(["--checkpoint", str(checkpoint), "--format", "llama", "--output_dir", str(output_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"acx-rt export: error: --format llama: {field}")
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "overrides, bias, message",
    [
        (dict(num_shared_experts=1), False, "qk_norm=True with num_shared_experts=1: Qwen3-MoE"),
        (dict(), True, "qk_norm=True with a nonzero router balancing bias"),
    ],
)
def test_qk_norm_moe_that_qwen3_moe_cannot_represent_is_refused(tmp_path, capsys, overrides, bias, message):
    model = RamanujanForCausalLM(tiny_moe_config(qk_norm=True, **overrides))
    if bias:
        with torch.no_grad():
            router_biases(model)[0].copy_(torch.tensor([0.01, 0.0, 0.0, -0.01]))
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    output_dir = tmp_path / "llama"
    assert export.main(["--checkpoint", str(checkpoint), "--format", "llama", "--output_dir", str(output_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"acx-rt export: error: --format llama: {message}")
    assert not output_dir.exists()


def test_llama_format_needs_none_of_the_export_extra():
    """`export` and `export_llama` import no ONNX or GGUF package: `--format llama` works without the [export] extra."""
    code = (
        "import sys, acx_ramanujan.export, acx_ramanujan.export.llama\n"
        "extra = ('onnx', 'onnxruntime', 'onnxscript', 'gguf')\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & set(extra)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
