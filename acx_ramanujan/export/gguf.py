"""`acx-rt export --format gguf`: one GGUF file for llama.cpp (and what runs on it: Ollama, LM Studio ...).

Written with the `gguf` package (llama.cpp's own writer) from the Llama / Mixtral / Qwen3 / Qwen3-MoE model
`export_llama` builds, so the attention temperature is already folded into q_proj (q_norm with qk_norm) and the same
refusals apply. Architectures: "llama" (dense, and Mixtral's experts as llama.cpp stores them); with qk_norm "qwen3"
and "qwen3moe" (`attn_q_norm` / `attn_k_norm` per layer). What differs from the Transformers layout:

- llama.cpp's "llama" rotates adjacent pairs (2i, 2i+1) of q and k; Transformers' Llama rotates (i, i + d/2). Each
  head's rows of q_proj and k_proj are reordered so that pair i lands at (2i, 2i+1): the same dot products, exactly.
  Its "qwen3" and "qwen3moe" rotate (i, i + d/2) as Transformers does (NEOX rope, llama_model_rope_type in
  llama.cpp's src/llama-model.cpp): no reordering.
- On "llama", RoPE types that only rescale the frequencies (default, linear, llama3) go as `rope.freq_base` plus
  llama.cpp's `rope_freqs` tensor (per pair, the factor its frequency is divided by), taken from Transformers' own
  rotary tables. Types whose tables scale cos/sin or change with the length (yarn, longrope, dynamic) are refused.
  llama.cpp's "qwen3" / "qwen3moe" graphs read no `rope_freqs`: there only the default rope type is written.
- llama.cpp's "qwen3moe" makes every layer MoE and always renormalizes the top-k weights: leading dense layers
  (Qwen3-MoE's `mlp_only_layers`) and `norm_topk_prob=False` are refused there.

Tokenizer: a "gpt2" byte-level BPE vocabulary, the same tokens and merges as the exported `tokenizer.json` (byte
b is the token written in GPT-2's byte alphabet, id b; <pad>, <s>, </s> are control tokens). llama.cpp insists on
a merges list and gguf cannot write an empty one, so the byte tokenizer's list holds one merge of two control
tokens, which text never produces.
"""

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import MixtralConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen3MoeConfig

from ..commands import InputError
from . import ExportError
from .llama import UnrepresentableError, fast_tokenizer, pairs_adjacent, to_transformers_model
from ..files import first_line

OUTTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, None),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
DEFAULT_OUTTYPE = "f16"
# Max |llama.cpp − PyTorch| logit allowed per type (q8_0 is reported only); measured on the tests' tiny models:
MAX_ABS_DIFF = {"f32": 1e-3, "f16": 2e-2}
VERIFY_TEXTS = ["Hello, world!", "Ramanujan ∑ 1729 — é 漢字 😀", "  two spaces\tand a tab\n"]
GENERATE_TOKENS = 8
N_CTX = 64
# Transformers model_type → llama.cpp architecture, and the rope types written for it.
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mixtral": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3,
                 "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE}
ROPE_TYPES = {gguf.MODEL_ARCH.LLAMA: ("default", "linear", "llama3"), gguf.MODEL_ARCH.QWEN3: ("default",),
              gguf.MODEL_ARCH.QWEN3MOE: ("default",)}
GGUF_FILE = "model-{outtype}.gguf"
# Stands in for the empty merges list of a merge-free vocabulary (see the module docstring).
INERT_MERGE = "<s> </s>"


class GgufError(ValueError):
    """What llama.cpp's architectures cannot represent, named."""


def architecture(config) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for the exported Transformers config; GgufError names what it cannot represent."""
    if config.model_type not in ARCHITECTURES:
        raise GgufError(
            f"the model maps to {config.architectures[0]} (shared experts, leading dense layers or a nonzero router "
            "balancing bias); the GGUF export writes llama.cpp's llama architecture, dense or Mixtral-style MoE, and "
            "with qk_norm its qwen3 / qwen3moe (export --format llama keeps it)"
        )
    arch = ARCHITECTURES[config.model_type]
    name = gguf.MODEL_ARCH_NAMES[arch]
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type not in ROPE_TYPES[arch]:
        raise GgufError(
            f"rope_parameters.rope_type {rope_type!r}: the GGUF export writes {', '.join(ROPE_TYPES[arch])} for "
            f"llama.cpp's {name} architecture (frequency-only rescaling, as rope_freqs, on llama only); "
            "export --format llama keeps it"
        )
    if isinstance(config, Qwen3MoeConfig) and config.mlp_only_layers:
        raise GgufError(
            f"first_k_dense_layers={len(config.mlp_only_layers)}: llama.cpp's qwen3moe makes every layer MoE "
            "(export --format llama keeps it)"
        )
    if isinstance(config, Qwen3MoeConfig) and not config.norm_topk_prob:
        raise GgufError(
            "norm_topk_prob=False: llama.cpp's qwen3moe always renormalizes the top-k weights (export --format llama "
            "keeps it)"
        )
    return arch


def rope_factors(model: PreTrainedModel) -> np.ndarray | None:
    """Per rotary pair, default frequency / actual frequency (llama.cpp's `rope_freqs`); None when all are 1."""
    config = model.config
    rotary = model.model.rotary_emb
    head_dim = config.head_dim
    base = config.rope_parameters["rope_theta"]
    default = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factors = default / rotary.inv_freq.double()
    if torch.allclose(factors, torch.ones_like(factors), rtol=0, atol=1e-6):
        return None
    return factors.float().numpy()


def gguf_tensors(model: PreTrainedModel, arch: gguf.MODEL_ARCH) -> dict[str, torch.Tensor]:
    """GGUF name → tensor (float32), named through gguf's own table of Transformers names for `arch`."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    adjacent_pairs = arch == gguf.MODEL_ARCH.LLAMA  # the rope layout of llama.cpp's llama (see the module docstring)
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.float()
        if adjacent_pairs and name.endswith("self_attn.q_proj.weight"):
            tensor = pairs_adjacent(tensor, config.num_attention_heads)
        elif adjacent_pairs and name.endswith("self_attn.k_proj.weight"):
            tensor = pairs_adjacent(tensor, config.num_key_value_heads)
        if name.endswith("experts.gate_up_proj"):  # (E, 2I, H), gate first: llama.cpp keeps gate and up apart
            layer = name.split(".")[2]
            gate, up = tensor.chunk(2, dim=1)
            tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_EXP].format(bid=layer) + ".weight"] = gate
            tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_UP_EXP].format(bid=layer) + ".weight"] = up
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise GgufError(f"no GGUF name for tensor {name}")
        tensors[gguf_name if gguf_name.endswith(".weight") else gguf_name + ".weight"] = tensor
    factors = rope_factors(model)
    if factors is not None:
        tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = torch.from_numpy(factors)
    return tensors


def stored(tensor: torch.Tensor, quantization: gguf.GGMLQuantizationType | None):
    """(data, raw type) in the requested type; vectors and rows that do not fit the block stay float32, as
    llama.cpp's converter keeps norms and small tensors in full precision."""
    data = tensor.numpy()
    if quantization is None or data.ndim == 1:
        return data, None
    if quantization == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    block_size, _ = gguf.GGML_QUANT_SIZES[quantization]
    if data.shape[-1] % block_size:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, quantization), quantization


def write_metadata(writer: gguf.GGUFWriter, config, file_type: gguf.LlamaFileType, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if isinstance(config, MixtralConfig):
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if isinstance(config, Qwen3MoeConfig):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def write_vocabulary(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast) -> None:
    """The fast tokenizer's byte-level BPE as llama.cpp's "gpt2" vocabulary (tokens, types, merges, specials)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    added = {token["id"]: token for token in backend["added_tokens"]}
    tokens = [None] * len(tokenizer)
    for token, index in {**vocab, **{entry["content"]: index for index, entry in added.items()}}.items():
        tokens[index] = token
    types = [
        gguf.TokenType.CONTROL if index in added and added[index]["special"]
        else gguf.TokenType.USER_DEFINED if index in added
        else gguf.TokenType.NORMAL
        for index in range(len(tokens))
    ]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split that `tokenizers`' ByteLevel pre-tokenizer makes
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges or [INERT_MERGE])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def check_vocabulary(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> None:
    if len(tokenizer) != vocab_size:
        raise GgufError(
            f"the tokenizer has {len(tokenizer)} tokens and the model vocab_size {vocab_size}: llama.cpp needs one "
            "token per embedding row"
        )
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or (backend["pre_tokenizer"] or {}).get("type") != "ByteLevel":
        raise GgufError("the tokenizer is not a byte-level BPE, the only kind this GGUF export writes")
    if any(token is None for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        raise GgufError("the tokenizer's ids have gaps; llama.cpp numbers tokens 0..n-1")


def export_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, outtype: str, directory: Path) -> Path:
    """Write `model-{outtype}.gguf` into `directory`. `model` is the Llama / Mixtral / Qwen3 / Qwen3-MoE from
    `export_llama`."""
    arch = architecture(model.config)
    check_vocabulary(tokenizer, model.config.vocab_size)
    file_type, quantization = OUTTYPES[outtype]
    path = directory / GGUF_FILE.format(outtype=outtype)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    write_metadata(writer, model.config, file_type, f"acx-ramanujan {model.config.architectures[0]}")
    write_vocabulary(writer, tokenizer)
    for name, tensor in gguf_tensors(model, arch).items():
        data, raw_type = stored(tensor, quantization)
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export(model: PreTrainedModel, checkpoint: Path, args, directory: Path) -> tuple[list[str], list[str]]:
    """Write `model-{outtype}.gguf` and, when llama-cpp-python is installed, run it: (written files, report lines)."""
    outtype = args.outtype or DEFAULT_OUTTYPE
    try:
        target = to_transformers_model(model)
        tokenizer = fast_tokenizer(checkpoint)
        if tokenizer is None:
            raise GgufError("the checkpoint has no tokenizer.json and no byte tokenizer, and a GGUF file carries one")
        path = export_gguf(target, tokenizer, outtype, directory)
    except (UnrepresentableError, GgufError) as error:
        raise InputError(f"--format gguf: {error}") from None
    return [path.name], verify(path, model, tokenizer, outtype)


def verify(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, outtype: str) -> list[str]:
    """llama.cpp's tokens, logits and greedy tokens against ours; f32 and f16 must agree, q8_0 is reported."""
    if importlib.util.find_spec("llama_cpp") is None:
        return ["not run in llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python)"]
    try:
        prompts, logits, generated = llama_cpp_run(path, VERIFY_TEXTS, GENERATE_TOKENS)
    except (ValueError, RuntimeError) as error:  # llama-cpp-python's "Failed to load model from file", and the like
        raise ExportError(f"llama.cpp cannot run the written file: {first_line(error)}") from error
    expected_prompts = [tokenizer(text).input_ids for text in VERIFY_TEXTS]
    if prompts != expected_prompts:
        raise ExportError(f"llama.cpp tokenizes {VERIFY_TEXTS} as {prompts}, the tokenizer as {expected_prompts}")
    expected_logits, expected_tokens = reference_run(model, prompts, GENERATE_TOKENS)
    difference = max(float(np.abs(ours - theirs).max()) for ours, theirs in zip(expected_logits, logits))
    same_tokens = generated == expected_tokens
    limit = MAX_ABS_DIFF.get(outtype)
    report = (f"llama.cpp ({outtype}) vs PyTorch on {len(prompts)} prompts: tokenization equal, max |logit difference| "
              f"{difference:.1e}" + (f" (limit {limit:g})" if limit else " (not checked)")
              + f", {GENERATE_TOKENS} greedy tokens {'equal' if same_tokens else 'differ'}")
    if limit is not None and not difference <= limit:
        raise ExportError(f"llama.cpp logits differ from PyTorch by {difference:.2e} (> {limit:g})")
    if limit is not None and not same_tokens:
        raise ExportError(f"llama.cpp generated {generated} greedily, PyTorch {expected_tokens}")
    return [report]


def llama_cpp_run(path: Path, texts: list[str], new_tokens: int):
    """Through llama.cpp (llama-cpp-python): each text's tokens (with bos), the logits of every position of it, and
    `new_tokens` greedy tokens after it.

    Each prompt is evaluated from an empty cache; the greedy tokens are fed back one at a time through llama.cpp's
    KV cache, so both its prefill and its decoding path are compared.
    """
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=1, verbose=False)
    prompts = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) for text in texts]
    logits, generated = [], []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        logits.append(np.array(llm.scores[: len(prompt)]))
        tokens = []
        for _ in range(new_tokens):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(tokens[-1:])
        generated.append(tokens)
    llm.close()
    return prompts, logits, generated


def reference_run(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int):
    """The same from a PyTorch model, recomputing the whole sequence for each token (no cache)."""
    logits, generated = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logits.append(model(ids, use_cache=False).logits[0].numpy())
            for _ in range(new_tokens):
                next_token = model(ids, use_cache=False).logits[0, -1].argmax().reshape(1, 1)
                ids = torch.cat([ids, next_token], dim=1)
            generated.append(ids[0, len(prompt) :].tolist())
    return logits, generated
