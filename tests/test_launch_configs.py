"""Every shipped Accelerate config either runs here as two CPU processes, as written (its own mixed precision), or
is marked GPU-only in the configs' README with the reason; and the run's first line says how it is laid out."""

import importlib.util
import json
import math
import re

import pytest
import yaml

from acx_ramanujan.training import pretrain
from test_fsdp import CONFIGS, launch
from test_pretraining import read_jsonl, train_args

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
README = CONFIGS / "README.md"
RUN_HERE = {"ddp.yaml": "MULTI_CPU", "fsdp.yaml": "FSDP"}  # config → the distributed type it runs as on CPU


def readme_rows() -> dict[str, str]:
    """config file name → its row in the README's table."""
    rows = re.findall(r"^\| `([\w.]+\.yaml)` \|(.*)$", README.read_text(), flags=re.MULTILINE)
    return dict(rows)


def test_every_config_is_run_here_or_marked_gpu_only_with_the_reason():
    shipped = sorted(path.name for path in CONFIGS.glob("*.yaml"))
    rows = readme_rows()
    assert sorted(rows) == shipped  # every file has a row, every row a file
    for name in shipped:
        if name in RUN_HERE:
            assert "tested on 2 CPU processes" in rows[name], name
        else:
            assert "GPU-only" in rows[name], name
    for name in shipped:
        if yaml.safe_load((CONFIGS / name).read_text())["distributed_type"] == "DEEPSPEED":
            assert importlib.util.find_spec("deepspeed") is None, "deepspeed is installed now: test its configs"
            assert "DeepSpeed is not installed" in rows[name]


@pytest.mark.parametrize("config_file", sorted(RUN_HERE))
def test_shipped_config_runs_as_two_cpu_processes_as_written(tmp_path, corpus, config_file):
    """Only the process count and the device change (`--num_processes 2`, ACCELERATE_USE_CPU=1): the config's own
    bf16 and, for FSDP, its sharding and checkpoint format."""
    out = tmp_path / "run"
    args = train_args(corpus, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    result = launch(CONFIGS / config_file, args, mixed_precision=None)  # the config's own precision
    config = yaml.safe_load((CONFIGS / config_file).read_text())
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"2 processes, distributed type {RUN_HERE[config_file]}, backend gloo, device cpu, "
                            f"mixed precision {config['mixed_precision']}"), first
    hyperparameters = json.loads((out / "training_args.json").read_text())
    assert hyperparameters["num_processes"] == 2 and hyperparameters["mixed_precision"] == config["mixed_precision"]
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    sharded = (out / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    assert sharded == (RUN_HERE[config_file] == "FSDP")


def test_one_process_says_so(tmp_path, corpus, capsys):
    """What `accelerate launch --cpu --num_processes 2` really starts (one process, accelerate#2741) is visible."""
    assert pretrain.main(train_args(corpus, tmp_path / "run", "--max_train_steps", "1")) == 0
    assert capsys.readouterr().out.splitlines()[0] == ("1 process, distributed type NO, backend none, device cpu, "
                                                       "mixed precision no (ACCELERATE_MIXED_PRECISION, which `accelerate launch` sets)")
