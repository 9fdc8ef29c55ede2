"""A damaged or non-finite model.safetensors is refused in one line, naming the file (and the first bad tensor),
by every command that reads a checkpoint: finetune, export, visualize and push (saved_files.check_saved_weights).

The damage is made independently of the check: bytes cut or flipped with plain file I/O, NaN/inf written through
safetensors' own `save_file`.
"""

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from acx_ramanujan import RamanujanByteTokenizer, RamanujanForCausalLM
from acx_ramanujan.cli import main as acx_rt
from acx_ramanujan.files import check_saved_weights

POISONED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good") / "checkpoint"
    torch.manual_seed(0)
    RamanujanForCausalLM(tiny_config()).save_pretrained(directory)
    RamanujanByteTokenizer().save_pretrained(directory)
    return directory


def truncate(weights):
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def flip_header(weights):
    data = bytearray(weights.read_bytes())
    data[10] ^= 0xFF  # inside the JSON header that follows the 8-byte length
    weights.write_bytes(bytes(data))


def poison(value):
    def write(weights):
        tensors = load_file(weights)
        tensors[POISONED][0, 1] = value
        save_file(tensors, weights, metadata={"format": "pt"})

    return write


DAMAGE = {
    "truncated": (truncate, "model.safetensors is not a readable safetensors file: "),
    "flipped header": (flip_header, "model.safetensors is not a readable safetensors file: "),
    "nan": (poison(float("nan")), f"model.safetensors holds non-finite values (NaN or inf) in {POISONED}"),
    "inf": (poison(float("-inf")), f"model.safetensors holds non-finite values (NaN or inf) in {POISONED}"),
}


@pytest.fixture(params=DAMAGE)
def damaged(request, good_checkpoint, tmp_path):
    damage, message = DAMAGE[request.param]
    checkpoint = tmp_path / "damaged"
    shutil.copytree(good_checkpoint, checkpoint)
    damage(checkpoint / "model.safetensors")
    return checkpoint, f"{checkpoint}/{message}"


def test_the_check_passes_a_good_checkpoint_and_returns_its_shapes(good_checkpoint):
    expected = {name: tuple(tensor.shape) for name, tensor in load_file(good_checkpoint / "model.safetensors").items()}
    assert check_saved_weights(good_checkpoint) == expected


def test_the_check_follows_the_shard_index(good_checkpoint, tmp_path):
    sharded = tmp_path / "sharded"
    RamanujanForCausalLM.from_pretrained(good_checkpoint).save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    tensors = load_file(shards[-1])
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("inf")
    save_file(tensors, shards[-1], metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{shards[-1].name} holds non-finite values .* in "):
        check_saved_weights(sharded)


def finetune_argv(checkpoint, tmp_path) -> list[str]:
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox"}) + "\n" for i in range(40)))
    return ["finetune", "--model_name_or_path", str(checkpoint), "--train_file", str(data), "--output_dir",
            str(tmp_path / "out"), "--max_steps", "1", "--block_size", "16", "--report_to", "none", "--use_cpu", "true",
            "--disable_tqdm", "true"]


# command: (arguments for a checkpoint and a scratch folder, exit status, start of the error line)
COMMANDS = {
    "finetune": (finetune_argv, 2, "acx-rt finetune: error: "),
    "export": (lambda checkpoint, tmp_path: ["export", "--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out")],
               2, "acx-rt export: error: "),
    "visualize": (lambda checkpoint, tmp_path: ["visualize", "--checkpoint", str(checkpoint), "--output_dir",
                                                str(tmp_path / "out"), "--type", "variance"], 2, "acx-rt visualize: error: "),
    # --dry_run runs every local check without the Hub; test_hub shows that a failing check sends no request.
    "push": (lambda checkpoint, tmp_path: ["push", str(checkpoint), "test-user/damaged", "--dry_run"], 2, "acx-rt push: error: "),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_damaged_weights_in_one_line_before_any_work(damaged, command, tmp_path, capsys):
    checkpoint, message = damaged
    arguments, expected_status, prefix = COMMANDS[command]
    status = acx_rt(arguments(checkpoint, tmp_path))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert status == expected_status and lines[0].startswith(prefix) and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
