"""`acx-rt export --format gguf`: the file's contents (read back with gguf's reader), and, marked `llama_cpp`, the file run
in llama.cpp through llama-cpp-python against our model: tokens, logits and greedy tokens."""

import numpy as np
import pytest
import torch
from conftest import save_checkpoint, tiny_config, tiny_moe_config

from acx_ramanujan import RamanujanByteTokenizer, RamanujanForCausalLM, export
from acx_ramanujan.training.bpe import train_bpe_tokenizer

gguf = pytest.importorskip("gguf")  # in the [export] extra, like onnx for the ONNX tests
from acx_ramanujan.export import gguf as export_gguf  # noqa: E402  (needs gguf)

TEXTS = ["Hello, world!", "Ramanujan ∑ 1729 — é 漢字 😀", "  two spaces\tand a tab\n", "the cat sat on the mat"]
NEW_TOKENS = 8
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def export_file(tmp_path, config, outtype, tokenizer=None):
    checkpoint = save_checkpoint(tmp_path / "checkpoint", config, tokenizer)
    output_dir = tmp_path / "gguf"
    argv = ["--checkpoint", str(checkpoint), "--format", "gguf", "--outtype", outtype, "--output_dir", str(output_dir)]
    assert export.main(argv) == 0
    return checkpoint, output_dir / f"model-{outtype}.gguf"


def field(reader, key):
    value = reader.get_field(key)
    return value.contents() if value is not None else None


def test_file_holds_the_llama_architecture_and_the_byte_vocabulary(tmp_path):
    config = tiny_config(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)
    _, path = export_file(tmp_path, config, "q8_0")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    # Byte b is token b, written in GPT-2's byte alphabet, which `tokenizers`' ByteLevel decodes back to the byte.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    assert tokens == [alphabet[b] for b in range(256)] + ["<pad>", "<s>", "</s>"]
    assert field(reader, "tokenizer.ggml.token_type")[256:] == [gguf.TokenType.CONTROL] * 3
    assert [field(reader, f"tokenizer.ggml.{name}_token_id") for name in ("padding", "bos", "eos")] == [256, 257, 258]

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd for the head
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # llama3 rope: llama.cpp divides each pair's frequency by rope_freqs: from 1 (high) up to `factor` (low frequencies).
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    # (head_dim 8: pair 0 is between llama3's two wavelength bounds, the other three beyond the low-frequency one.)
    assert 1.0 < factors[0] < 8.0
    np.testing.assert_allclose(factors[1:], 8.0, rtol=1e-6)


@pytest.mark.parametrize("moe", [False, True])
def test_qk_norm_file_holds_qwen3_with_its_q_and_k_norms_and_neox_rows(tmp_path, moe):
    """qk_norm → llama.cpp's qwen3 / qwen3moe: q/k norms per layer (q_norm with the temperature folded in, as in the
    Qwen3 export), q_proj and k_proj rows in Transformers' order (qwen3 ropes NEOX-style: no reordering)."""
    from acx_ramanujan.export.llama import to_transformers_model

    overrides = dict(qk_norm=True, attention_scale_alpha=0.5, tie_word_embeddings=True)
    config = tiny_moe_config(**overrides) if moe else tiny_config(**overrides)
    checkpoint, path = export_file(tmp_path, config, "f32")
    reader = gguf.GGUFReader(path)
    arch = "qwen3moe" if moe else "qwen3"
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.attention.key_length") == config.head_dim
    tensors = {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}
    qwen3 = to_transformers_model(RamanujanForCausalLM.from_pretrained(checkpoint)).state_dict()
    for layer in range(config.num_hidden_layers):
        ours = f"model.layers.{layer}.self_attn."
        for gguf_name, name in (("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm"), ("attn_q", "q_proj"),
                                ("attn_k", "k_proj")):
            expected = qwen3[ours + name + ".weight"].numpy()
            np.testing.assert_array_equal(tensors[f"blk.{layer}.{gguf_name}.weight"], expected)
    if moe:
        assert field(reader, "qwen3moe.expert_count") == config.num_experts
        assert field(reader, "qwen3moe.expert_used_count") == config.num_experts_per_tok
        assert field(reader, "qwen3moe.expert_feed_forward_length") == config.moe_intermediate_size
        assert tensors["blk.1.ffn_gate_exps.weight"].shape == (config.num_experts, config.moe_intermediate_size,
                                                               config.hidden_size)
    assert "rope_freqs.weight" not in tensors and "output.weight" not in tensors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(qk_norm=True, rope_parameters=LLAMA3_ROPE),
         "rope_type 'llama3': the GGUF export writes default for llama.cpp's qwen3"),
        (dict(qk_norm=True, num_experts=4, first_k_dense_layers=1),
         "first_k_dense_layers=1: llama.cpp's qwen3moe makes every layer MoE"),
        (dict(qk_norm=True, num_experts=4, norm_topk_prob=False),
         "norm_topk_prob=False: llama.cpp's qwen3moe always renormalizes"),
        (dict(qk_norm=True, num_experts=4, num_shared_experts=1), "qk_norm=True with num_shared_experts=1: Qwen3-MoE"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), "rope_type 'yarn'"),
        (dict(num_experts=4, num_shared_experts=1), "maps to Ernie4_5_MoeForCausalLM (shared experts, leading dense layers"),
        (dict(num_experts=4, norm_topk_prob=False), "norm_topk_prob=False has no exact in-library equivalent"),
        (dict(vocab_size=320), "the tokenizer has 259 tokens and the model vocab_size 320"),
        (dict(deepnorm=True, init_scheme="deepnorm"), "--format gguf: deepnorm=True (post-norm layers"),
    ],
)
def test_what_llama_cpp_cannot_represent_is_refused(tmp_path, capsys, overrides, message):
    checkpoint = save_checkpoint(tmp_path / "checkpoint", tiny_config(**overrides))
    output_dir = tmp_path / "gguf"
    assert export.main(["--checkpoint", str(checkpoint), "--format", "gguf", "--output_dir", str(output_dir)]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not output_dir.exists()


DEPTH_SCHEMES = dict(depth_parametrization="completep", depth_base_layers=1, layernorm_scaling=True)


# Transformers' GGUF reader takes head_dim (qwen3) and the expert width (qwen3moe) from its config defaults, not from the
# file: 128 and 768 here, as in Qwen3's released models, so that it builds the shapes the file holds.
QWEN3_READER_SHAPE = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128, moe_intermediate_size=768)


@pytest.mark.parametrize("overrides, architecture", [
    (dict(attention_scale_alpha=0.3), "LlamaForCausalLM"),
    (dict(attention_scale_alpha=0.3, **DEPTH_SCHEMES), "LlamaForCausalLM"),
    (dict(qk_norm=True, attention_scale_alpha=0.3, **DEPTH_SCHEMES, **QWEN3_READER_SHAPE), "Qwen3ForCausalLM"),
    (dict(qk_norm=True, attention_scale_alpha=0.3, num_experts=4, **QWEN3_READER_SHAPE), "Qwen3MoeForCausalLM"),
])
def test_f32_file_read_by_transformers_gives_our_logits(tmp_path, overrides, architecture):
    """Transformers' own GGUF reader (llama files: it undoes llama.cpp's q/k row order; qwen3 / qwen3moe files as they
    are) as a second consumer of the file, where llama.cpp is not installed: the depth schemes' factors and the
    temperature are folded into the written weights."""
    from transformers import AutoModelForCausalLM

    checkpoint, path = export_file(tmp_path, tiny_config(num_hidden_layers=3, **overrides), "f32")
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model = RamanujanForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    input_ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        difference = (theirs(input_ids).logits - model(input_ids).logits).abs().max().item()
    assert type(theirs).__name__ == architecture and difference < 1e-5


def test_moe_experts_carry_the_folded_branch_multiplier(tmp_path):
    config = tiny_moe_config(num_hidden_layers=2, depth_parametrization="depth_mup", depth_base_layers=1)
    checkpoint, path = export_file(tmp_path, config, "f32")
    ours = RamanujanForCausalLM.from_pretrained(checkpoint).state_dict()
    tensors = {tensor.name: torch.from_numpy(np.array(tensor.data)) for tensor in gguf.GGUFReader(path).tensors}
    m = 2 ** -0.5  # depth-μP at L/L0 = 2
    for layer in range(2):
        torch.testing.assert_close(tensors[f"blk.{layer}.ffn_down_exps.weight"],
                                   ours[f"model.layers.{layer}.mlp.experts.down_proj"] * m)
        torch.testing.assert_close(tensors[f"blk.{layer}.attn_output.weight"],
                                   ours[f"model.layers.{layer}.self_attn.o_proj.weight"] * m)
        gate, up = ours[f"model.layers.{layer}.mlp.experts.gate_up_proj"].chunk(2, dim=1)
        assert torch.equal(tensors[f"blk.{layer}.ffn_up_exps.weight"], up)


# --- in llama.cpp -----------------------------------------------------------------------------------------------


@pytest.fixture
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; it compiles llama.cpp)"
    )


def ours(checkpoint, prompts):
    """Our logits per prompt, and NEW_TOKENS greedy tokens recomputed without a cache (eager attention)."""
    model = RamanujanForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    logits, generated = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logits.append(model(ids, use_cache=False).logits[0].numpy())
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False, eos_token_id=None)
            generated.append(out[0, len(prompt) :].tolist())
    return logits, generated


@pytest.mark.llama_cpp
@pytest.mark.parametrize(
    "name, config, outtype, limit",
    [
        ("dense_alpha", tiny_config(attention_scale_alpha=0.3), "f32", 1e-3),
        ("dense_alpha", tiny_config(attention_scale_alpha=0.3), "f16", 2e-2),
        ("tied_llama3_mqa", tiny_config(tie_word_embeddings=True, num_key_value_heads=1, head_dim=16,
                                        attention_scale_alpha=0.8, rope_parameters=LLAMA3_ROPE), "f16", 2e-2),
        ("linear_rope", tiny_config(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}),
         "f32", 1e-3),
        ("moe_as_mixtral", tiny_moe_config(attention_scale_alpha=0.5), "f32", 1e-3),
        ("dense_depth_schemes", tiny_config(num_hidden_layers=3, **DEPTH_SCHEMES), "f32", 1e-3),
        ("moe_depth_schemes", tiny_moe_config(num_hidden_layers=3, **DEPTH_SCHEMES), "f32", 1e-3),
        ("qk_norm_as_qwen3", tiny_config(qk_norm=True, attention_scale_alpha=0.3), "f32", 1e-3),
        ("qk_norm_as_qwen3", tiny_config(qk_norm=True, attention_scale_alpha=0.3), "f16", 2e-2),
        ("qk_norm_tied_mqa_as_qwen3", tiny_config(qk_norm=True, tie_word_embeddings=True, num_key_value_heads=1,
                                                  head_dim=16, attention_scale_alpha=0.8), "f32", 1e-3),
        ("qk_norm_moe_as_qwen3moe", tiny_moe_config(qk_norm=True, attention_scale_alpha=0.5), "f32", 1e-3),
        ("bpe_tokenizer", None, "f32", 1e-3),
        ("dense_alpha", tiny_config(attention_scale_alpha=0.3), "q8_0", None),
    ],
)
def test_llama_cpp_runs_the_file_like_our_model(tmp_path, llama_cpp, name, config, outtype, limit):
    tokenizer = None
    if name == "bpe_tokenizer":
        tokenizer = train_bpe_tokenizer(iter(["the cat sat on the mat " * 20, "the dog sat on the log " * 20]), 300)
        config = tiny_config(vocab_size=len(tokenizer), attention_scale_alpha=0.3)
    checkpoint, path = export_file(tmp_path, config, outtype, tokenizer)
    expected_arch = "qwen3moe" if name.endswith("qwen3moe") else "qwen3" if name.endswith("qwen3") else "llama"
    assert field(gguf.GGUFReader(path), "general.architecture") == expected_arch
    prompts, logits, generated = export_gguf.llama_cpp_run(path, TEXTS, NEW_TOKENS)

    tokenizer = tokenizer or RamanujanByteTokenizer()
    assert prompts == [tokenizer(text).input_ids for text in TEXTS]
    if name == "bpe_tokenizer":
        assert max(prompts[-1]) >= 259, "the merges were not used"
    expected_logits, expected_tokens = ours(checkpoint, prompts)
    difference = max(float(np.abs(a - b).max()) for a, b in zip(expected_logits, logits))
    print(f"{name} {outtype}: max |llama.cpp - PyTorch| logit {difference:.2e}, greedy equal: {generated == expected_tokens}")
    if limit is not None:  # q8_0 is reported, not asserted
        assert difference < limit
        assert generated == expected_tokens
