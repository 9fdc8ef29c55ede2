"""FSDP2 for real on CPU: two processes over gloo launched with the shipped fsdp.yaml shard every parameter, train
like one process with the same global batch, resume bit-exactly from sharded (torch.distributed.checkpoint)
checkpoints and save a normal safetensors model; and a resume refuses a DCP folder that would run code."""

import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from acx_ramanujan.training import pretrain
from acx_ramanujan.training.checkpoints import BadCheckpoint, check_checkpoint_files
from test_pretraining import MOE, TINY, free_port, read_jsonl, train_args

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "training_scripts" / "accelerate_configs"


def launch(config_file: Path | None, args: list[str], num_processes: int = 2, env: dict | None = None,
           mixed_precision: str | None = "no") -> subprocess.CompletedProcess:
    """`accelerate launch` of training_scripts/pretrain.py as N CPU processes (ACCELERATE_USE_CPU=1), with a shipped
    config file or none (`--multi_gpu`: plain DDP); fp32 by default, so that runs compare with one process (None:
    the config's own precision)."""
    layout = ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    precision = ["--mixed_precision", mixed_precision] if mixed_precision else []
    command = [sys.executable, "-m", "accelerate.commands.launch", *layout, "--num_processes", str(num_processes),
               "--num_machines", "1", *precision, "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO_ROOT / "training_scripts" / "pretrain.py"), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **(env or {})}
    result = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def shard_lines(output: str) -> dict[int, tuple[int, int, float]]:
    """rank → (elements held, elements in all, largest share of one parameter) from each process's startup line."""
    found = re.findall(r"rank (\d+) of 2 holds ([\d,]+) of ([\d,]+) parameter elements \([\d.]+%\); largest share of "
                       r"one parameter ([\d.]+)%(.*)", output)
    assert all(rest == "" for *_, rest in found), found  # no parameter left unsharded
    return {int(rank): (int(held.replace(",", "")), int(total.replace(",", "")), float(largest) / 100)
            for rank, held, total, largest, _ in found}


# The load-balancing loss of a batch is a product of two batch means (Switch Transformer), so two halves do not add up
# to the whole batch's: the MoE comparison turns it off. The z-loss, a mean over tokens, stays on.
@pytest.mark.parametrize("overrides", [TINY, MOE + ",router_aux_loss_coef=0"], ids=["dense", "moe"])
def test_fsdp_on_two_cpu_processes_shards_trains_like_one_and_resumes_exactly(tmp_path, corpus, overrides):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    # AdamW: the optimizer FSDP runs get by default (Muon needs whole matrices), for the one-process run too.
    steps = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--optimizer", "adamw")
    assert pretrain.main(train_args(corpus, one, *steps, overrides=overrides)) == 0  # batch 4, one process
    fsdp_args = train_args(corpus, two, *steps, overrides=overrides)
    fsdp_args[fsdp_args.index("--per_device_train_batch_size") + 1] = "2"
    result = launch(CONFIGS / "fsdp.yaml", fsdp_args)

    # The run says what it is, and each process reports (from its own DTensor shards) holding half of everything.
    assert ("2 processes, distributed type FSDP, backend gloo, device cpu, mixed precision no; FSDP2 sharding "
            "FULL_SHARD (reshard_after_forward=True), one unit per RamanujanDecoderLayer, checkpoints "
            "SHARDED_STATE_DICT") in result.stdout
    shards = shard_lines(result.stdout)
    one_weights = load_file(one / "model.safetensors")
    # Parameters only: the MoE layers' balancing bias is a buffer, saved but not sharded.
    total = sum(t.numel() for name, t in one_weights.items() if not name.endswith("e_score_correction_bias"))
    assert sorted(shards) == [0, 1] and {entry[1] for entry in shards.values()} == {total}
    assert sum(entry[0] for entry in shards.values()) == total  # the shards partition the parameters
    for held, _, largest in shards.values():
        assert held / total == pytest.approx(0.5, abs=0.01) and 0.5 <= largest <= 0.51

    # Same global batch, same losses and weights as one process (the tolerance the DDP test meets).
    two_weights = load_file(two / "model.safetensors")  # gathered by the main process into one safetensors file
    assert two_weights.keys() == one_weights.keys()
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=1e-4, atol=1e-5, msg=name)
    losses = [[r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for d in (one, two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(two).config.architectures == ["RamanujanForCausalLM"]

    # Sharded checkpoints: one DCP file per process for the model and for the optimizer, no full weights.
    checkpoint = two / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / folder).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    # Resume at step 2 with the same world size: bit-exact.
    resume_args = train_args(corpus, resumed, *steps, "--resume_from_checkpoint", str(checkpoint), overrides=overrides)
    resume_args[resume_args.index("--per_device_train_batch_size") + 1] = "2"
    assert "Resumed from" in launch(CONFIGS / "fsdp.yaml", resume_args).stdout
    resumed_weights = load_file(resumed / "model.safetensors")
    for name in two_weights:
        assert torch.equal(resumed_weights[name], two_weights[name]), name
    assert json.loads((resumed / "eval_results.json").read_text()) == json.loads((two / "eval_results.json").read_text())


# ---------------------------------------------------------------------------------------------- DCP folders, safely


class RunsCode:
    """Unpickling this calls a function: what a forged checkpoint would do."""

    def __reduce__(self):
        return (os.getcwd, ())


def dcp_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint folder whose optimizer is saved by torch.distributed.checkpoint, as Accelerate's FSDP save does:
    tensors plus non-tensor values (the param groups' lr, betas), written in one process."""
    checkpoint = tmp_path / "checkpoint-2"
    state = {"optimizer": {"state": {"w": {"exp_avg": torch.ones(4, 2), "step": torch.tensor(2.0)}},
                           "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": ["w"]}]}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(checkpoint / "optimizer_0"), no_dist=True)
    return checkpoint


def test_a_dcp_checkpoint_of_plain_values_is_accepted(tmp_path):
    checkpoint = dcp_checkpoint(tmp_path)
    assert {p.name for p in (checkpoint / "optimizer_0").iterdir()} == {".metadata", "__0_0.distcp"}
    check_checkpoint_files(checkpoint, DistributedType.FSDP)


def forge_metadata(folder: Path) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode()))


def forge_value(folder: Path) -> None:
    """Replace the stored `lr` value by a pickle that calls a function (same length slot at the end of the file)."""
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    [(index, info)] = [(i, s) for i, s in metadata.storage_data.items() if i.fqn.endswith("param_groups.0.lr")]
    payload = io.BytesIO()
    torch.save(RunsCode(), payload)
    data_file = folder / info.relative_path
    info.offset, info.length = data_file.stat().st_size, len(payload.getvalue())
    with data_file.open("ab") as stream:
        stream.write(payload.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def add_stray_file(folder: Path) -> None:
    (folder / "extra.pkl").write_bytes(pickle.dumps(1))


@pytest.mark.parametrize("forge, message", [
    (forge_metadata, "optimizer_0/.metadata holds more than checkpoint metadata (posix.getcwd is not part"),
    (forge_value, "optimizer.param_groups.0.lr holds more than tensors and numbers"),
    (add_stray_file, "optimizer_0/extra.pkl is not a file of torch.distributed.checkpoint"),
    (lambda folder: (folder / ".metadata").unlink(), "optimizer_0/.metadata is missing"),
], ids=["metadata-runs-code", "value-runs-code", "stray-file", "no-metadata"])
def test_a_forged_dcp_checkpoint_is_refused_unread(tmp_path, forge, message):
    checkpoint = dcp_checkpoint(tmp_path)
    forge(checkpoint / "optimizer_0")
    with pytest.raises(BadCheckpoint) as refusal:
        check_checkpoint_files(checkpoint, DistributedType.FSDP)
    assert message in str(refusal.value) and "refused unread" in str(refusal.value)
