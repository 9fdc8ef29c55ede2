"""`acx-rt export --format onnx`: the ONNX graphs run in ONNX Runtime and agree with PyTorch, dense and MoE, with and without a cache."""

import json

import pytest
import torch
from conftest import save_checkpoint, tiny_config, tiny_moe_config
from transformers import AutoTokenizer, DynamicCache, LlamaConfig

from acx_ramanujan import RamanujanForCausalLM, export
from acx_ramanujan.export import onnx as export_onnx
from acx_ramanujan.modeling_ramanujan import CACHE_NAME

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from transformers.exporters import ExportedModel  # noqa: E402  (needs onnxscript)


def left_padded(batch, length, pad_token_id, seed):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    input_ids[attention_mask == 0] = pad_token_id
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def dense_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    checkpoint = save_checkpoint(root / "checkpoint", tiny_config())
    output_dir = root / "onnx"
    assert export.main(["--checkpoint", str(checkpoint), "--output_dir", str(output_dir)]) == 0
    return checkpoint, output_dir


def test_dense_graph_matches_eager_pytorch_on_new_shapes(dense_export):
    checkpoint, output_dir = dense_export
    session = onnxruntime.InferenceSession(str(output_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [spec.name for spec in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [spec.name for spec in session.get_outputs()] == ["logits"]

    # The export traced sdpa attention on batch 2; the reference is eager attention on another batch and length.
    reference = RamanujanForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    input_ids, attention_mask = left_padded(4, 23, reference.config.pad_token_id, seed=5)
    (logits,) = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.shape == (4, 23, 259)
    attended = attention_mask.bool()  # padded positions attend to nothing: their logits are undefined
    assert (torch.from_numpy(logits) - expected)[attended].abs().max() < 1e-4


def test_config_and_tokenizer_written_beside_the_graph(dense_export):
    checkpoint, output_dir = dense_export
    written = json.loads((output_dir / "config.json").read_text())
    original = json.loads((checkpoint / "config.json").read_text())
    assert written["model_type"] == "ramanujan"
    assert {key: written[key] for key in original if key != "transformers_version"} == {
        key: value for key, value in original.items() if key != "transformers_version"
    }
    text = "Ramanujan ∑ 1729"
    assert AutoTokenizer.from_pretrained(output_dir)(text).input_ids == AutoTokenizer.from_pretrained(checkpoint)(text).input_ids
    assert (output_dir / "generation_config.json").is_file()
    assert not [path for path in output_dir.parent.iterdir() if path.name.startswith(".")], "staging dir left behind"


def test_verification_rejects_a_graph_that_disagrees(dense_export):
    checkpoint, output_dir = dense_export
    perturbed = export.load_model(checkpoint)
    with torch.no_grad():
        perturbed.lm_head.weight.add_(0.01)
    with pytest.raises(export.ExportError, match="differ from PyTorch"):
        export_onnx.verify(output_dir, perturbed, with_past=False)


@pytest.mark.parametrize("config", [tiny_moe_config(num_shared_experts=1, eos_token_id=None),
                                    tiny_moe_config(qk_norm=True, attention_scale_alpha=0.5, eos_token_id=None)],
                         ids=["moe_shared", "moe_qk_norm"])
def test_moe_with_past_generates_like_generate(tmp_path, capsys, config):
    checkpoint = save_checkpoint(tmp_path / "checkpoint", config, seed=3)
    output_dir = tmp_path / "onnx"
    assert export.main(["--checkpoint", str(checkpoint), "--output_dir", str(output_dir), "--with_past"]) == 0
    assert "same as generate()" in capsys.readouterr().out
    # Cache inputs and outputs pair up by name (what ExportedModel and the README's ONNX Runtime loop rely on).
    session = onnxruntime.InferenceSession(str(output_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    layer_names = [f"{CACHE_NAME}.layers.{i}.{part}" for i in range(config.num_hidden_layers) for part in ("keys", "values")]
    assert [spec.name for spec in session.get_inputs()] == [
        "input_ids", "attention_mask", "position_ids", *(f"input.{name}" for name in layer_names)
    ]
    assert [spec.name for spec in session.get_outputs()] == ["logits", *(f"output.{name}" for name in layer_names)]

    # Reference: eager attention and eager (sorted, per-expert loop) experts; the export traced sdpa and grouped_mm.
    model = RamanujanForCausalLM.from_pretrained(
        checkpoint, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    prompt, attention_mask = left_padded(2, 9, config.pad_token_id, seed=7)
    new_tokens = 8
    with torch.no_grad():
        expected = model.generate(
            input_ids=prompt, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )

    # Step by step through Transformers' ONNX Runtime runner, the cache passed as a DynamicCache.
    exported = ExportedModel.from_pretrained(output_dir)
    cache = DynamicCache(config=config)
    empty = torch.zeros(2, config.num_key_value_heads, 0, config.head_dim)
    for layer_idx in range(config.num_hidden_layers):
        cache.update(empty, empty, layer_idx)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    input_ids, tokens, step_logits = prompt, [], []
    for _ in range(new_tokens):
        out = exported(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **{CACHE_NAME: cache}
        )
        cache = getattr(out, CACHE_NAME)
        step_logits.append(out.logits[:, -1])
        input_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(input_ids)
        attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], dim=1)
        position_ids = position_ids[:, -1:] + 1

    assert torch.equal(torch.cat(tokens, dim=1), expected.sequences[:, prompt.shape[1] :])
    assert (torch.stack(step_logits, 1) - torch.stack(expected.logits, 1)).abs().max() < 1e-4


@pytest.mark.parametrize("overrides", [
    dict(depth_parametrization="completep", depth_base_layers=1, layernorm_scaling=True),
    dict(deepnorm=True, init_scheme="deepnorm"),
])
def test_depth_scheme_graphs_match_eager_pytorch(tmp_path, overrides):
    """The ONNX export traces our own forward: a branch multiplier, LayerNorm Scaling and DeepNorm's post-norm layers
    are in the graph (the export's own check passed) and agree with eager PyTorch on another batch."""
    checkpoint = save_checkpoint(tmp_path / "checkpoint", tiny_config(num_hidden_layers=3, **overrides))
    output_dir = tmp_path / "onnx"
    assert export.main(["--checkpoint", str(checkpoint), "--output_dir", str(output_dir)]) == 0
    session = onnxruntime.InferenceSession(str(output_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = RamanujanForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    input_ids, attention_mask = left_padded(3, 17, reference.config.pad_token_id, seed=6)
    (logits,) = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (torch.from_numpy(logits) - expected)[attention_mask.bool()].abs().max() < 1e-4


def test_failed_verification_writes_nothing(tmp_path, monkeypatch, capsys):
    checkpoint = save_checkpoint(tmp_path / "checkpoint", tiny_config())
    output_dir = tmp_path / "onnx"

    def failing_verify(directory, model, with_past):
        assert (directory / "config.json").is_file() and directory != output_dir
        raise export.ExportError("logits differ")

    monkeypatch.setattr(export_onnx, "export_onnx", lambda model, with_past, opset, directory: model.config.save_pretrained(directory))
    monkeypatch.setattr(export_onnx, "verify", failing_verify)
    assert export.main(["--checkpoint", str(checkpoint), "--output_dir", str(output_dir)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "acx-rt export: error: logits differ"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint"]


def write_config(directory, config):
    config.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("format", ["--format", "tflite"], "unknown --format 'tflite'"),
        ("opset", ["--opset", "11"], "--opset 11 is outside 18-23"),
        ("with_past_not_onnx", ["--format", "llama", "--with_past"], "--format llama does not take --with_past"),
        ("outtype_not_gguf", ["--outtype", "f16"], "--format onnx does not take --outtype"),
        ("outtype", ["--format", "gguf", "--outtype", "q4_k"], "unknown --outtype 'q4_k'"),
        ("llama", [], "holds a 'llama' model, not a Ramanujan one"),
        ("no_config", [], "has no config.json"),
        ("no_weights", [], "cannot load --checkpoint"),
        ("malformed_config", [], "config.json is not a readable JSON file: Expecting property name"),
        ("config_not_object", [], "config.json does not hold a JSON object"),
        ("weights_of_another_shape", [], "cannot load --checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, case, extra, message):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    if case == "llama":
        write_config(checkpoint, LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    elif case == "malformed_config":
        (checkpoint / "config.json").write_text("{not json")
    elif case == "config_not_object":
        (checkpoint / "config.json").write_text('["ramanujan"]')
    elif case == "weights_of_another_shape":
        save_checkpoint(checkpoint, tiny_config())
        write_config(checkpoint, tiny_config(intermediate_size=48))
    elif case != "no_config":
        write_config(checkpoint, tiny_config())
    output_dir = tmp_path / "onnx"
    assert export.main(["--checkpoint", str(checkpoint), "--output_dir", str(output_dir), *extra]) != 0
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert not output_dir.exists()
