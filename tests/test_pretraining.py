"""`acx-rt train` end to end on tiny configs: outputs, evaluation against a naive loop, exact resume, SIGTERM,
two-process DDP against one process, bf16 autocast on CPU, and every bad input."""

import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate_state
from safetensors.torch import load_file

from acx_ramanujan import RamanujanConfig
from acx_ramanujan.training import precision, pretrain
from acx_ramanujan.training.checkpoints import list_checkpoints
from acx_ramanujan.cards import hardware_description
from acx_ramanujan.training.metrics import load_metric

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2," \
       "max_position_embeddings=64"
MOE = TINY + ",moe_intermediate_size=32,num_experts=4,num_experts_per_tok=2"
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def train_args(corpus: Path, output_dir: Path, *extra: str, overrides: str = TINY) -> list[str]:
    return ["--train_file", str(corpus), "--config_overrides", overrides, "--block_size", "32",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--learning_rate", "3e-3",
            "--num_warmup_steps", "2", "--output_dir", str(output_dir), *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def naive_eval_loss(output_dir: Path, corpus: Path) -> float:
    """Mean next-byte NLL of the saved model over the tail 10 % of the corpus, cut into 32-byte blocks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    lines = io.StringIO(corpus.read_text()).readlines()
    total, cut, kept = sum(map(len, lines)), 0, 0
    while kept < 0.9 * total:  # the train rows: lines up to 90 % of the characters
        kept += len(lines[cut])
        cut += 1
    stream = "".join(lines[cut:]).encode()
    blocks = torch.tensor([list(stream[i : i + 32]) for i in range(0, len(stream) - 31, 32)])
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()


def test_pretrain_is_a_function_the_study_and_tests_can_call(tmp_path, corpus):
    """`pretrain(training_arguments(...))` runs what `acx-rt train` runs: its results are all_results.json's, and bad
    input is an InputError (the CLI's exit status 2) before the output dir is created."""
    from acx_ramanujan.commands import InputError

    def arguments(output_dir, **values):
        return pretrain.training_arguments(**{
            "train_file": [str(corpus)], "config_overrides": TINY, "block_size": 32, "per_device_train_batch_size": 4,
            "max_train_steps": 2, "output_dir": str(output_dir), **values})

    results = pretrain.pretrain(arguments(tmp_path / "run"))
    assert results == json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["train_steps"] == 2 and math.isfinite(results["eval_loss"])
    with pytest.raises(InputError, match="block_size 128 exceeds the model's max_position_embeddings"):
        pretrain.pretrain(arguments(tmp_path / "refused", block_size=128))
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="unknown training argument"):
        pretrain.training_arguments(max_steps=2)  # TrainingArguments' name, not ours


@pytest.mark.parametrize("overrides, tracking", [(TINY, ("--with_tracking", "--report_to", "tensorboard")), (MOE, ())],
                         ids=["dense", "moe"])
def test_end_to_end_writes_every_output(tmp_path, corpus, overrides, tracking):
    out = tmp_path / "run"
    args = train_args(corpus, out, "--max_train_steps", "6", "--eval_steps", "3", "--checkpointing_steps", "3",
                      "--save_total_limit", "1", *tracking, overrides=overrides)
    assert pretrain.main(args) == 0

    for name in ("model.safetensors", "config.json", "generation_config.json", "configuration_ramanujan.py",
                 "modeling_ramanujan.py", "initialization_ramanujan.py", "tokenizer_config.json",
                 "README.md", "eval_results.json", "all_results.json", "training_args.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-6"]  # limit 1
    assert bool(list(out.rglob("events.out.tfevents*"))) == bool(tracking)
    assert not list(out.glob("*.partial")) and not list(out.glob(".*partial"))
    assert "auto_map" in json.loads((out / "config.json").read_text())
    assert hardware_description(torch.device("cpu"), 1) in (out / "README.md").read_text()  # as a fine-tuning card

    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(naive_eval_loss(out, corpus), rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    # Byte tokenizer on ASCII text: one byte per predicted token, so bits per byte = loss / ln 2.
    assert results["bits_per_byte"] == pytest.approx(results["eval_loss"] / math.log(2))
    all_results = json.loads((out / "all_results.json").read_text())
    assert all_results["train_steps"] == 6 and all_results["train_tokens"] == 6 * 4 * 32
    assert all_results["eval_loss"] == results["eval_loss"]

    log = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in log if "eval_loss" in r] == [3, 6]
    if "num_experts" in overrides:
        load = torch.tensor(results["expert_load"])
        assert load.shape == (2, 4)  # one row per MoE layer, one column per expert
        assert torch.allclose(load.sum(dim=1), torch.ones(2), atol=1e-4)
    else:
        assert "expert_load" not in results


@pytest.mark.parametrize("model, recipe", [
    (TINY, ()),  # the default recipe: packed blocks by epoch, Muon + AdamW, warmup, cosine to a floor
    (MOE, ()),
    (TINY + ",tie_word_embeddings=true", ()),  # one tensor under two names, saved once
    (TINY, ("--sampling", "windows")),
    (TINY, ("--sampling", "epochs", "--optimizer", "adamw", "--lr_scheduler_type", "cosine")),  # the old recipe
])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, corpus, model, recipe):
    """Dropout on, accumulation 2, a resume mid-run (with --sampling epochs: mid-epoch, and an epoch boundary after
    it): weights and loss identical."""
    # About 22 batches per epoch, 2 per step: steps 1-11 are epoch 0, 12-14 epoch 1.
    common = ("--max_train_steps", "14", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4", *recipe)
    overrides = model + ",attention_dropout=0.1"
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert pretrain.main(train_args(corpus, full, *common, overrides=overrides)) == 0
    reset_accelerate_state()
    resume = ("--resume_from_checkpoint", str(full / "checkpoint-4"))
    assert pretrain.main(train_args(corpus, resumed, *common, *resume, overrides=overrides)) == 0

    full_weights, resumed_weights = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert full_weights.keys() == resumed_weights.keys()
    for name in full_weights:
        assert torch.equal(full_weights[name], resumed_weights[name]), name
    def steps_after_4(log):
        return [(r["step"], r["loss"], r["learning_rate"]) for r in log if "loss" in r and r["step"] > 4]

    assert steps_after_4(read_jsonl(full / "metrics.jsonl")) == steps_after_4(read_jsonl(resumed / "metrics.jsonl"))
    assert json.loads((full / "eval_results.json").read_text()) == json.loads((resumed / "eval_results.json").read_text())


@pytest.mark.parametrize("model", [TINY + ",attention_dropout=0.1", MOE + ",router_bias_update_rate=0.01"])
def test_how_often_a_run_evaluates_changes_nothing_it_trains(tmp_path, corpus, model):
    """Time to target is read from runs that evaluate every few steps: those evaluations (dropout's RNG, the
    routers' counts, the loaders) must leave the weights and the training losses exactly as a run that never
    evaluates until the end."""
    runs = {"quiet": (), "every 2 steps": ("--eval_steps", "2")}
    for name, extra in runs.items():
        reset_accelerate_state()
        assert pretrain.main(train_args(corpus, tmp_path / name, "--max_train_steps", "7", *extra, overrides=model)) == 0
    quiet, evaluating = (load_file(tmp_path / name / "model.safetensors") for name in runs)
    assert all(torch.equal(quiet[name], evaluating[name]) for name in quiet)
    losses = {name: [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r] for name in runs}
    assert losses["quiet"] == losses["every 2 steps"] and len(losses["quiet"]) == 7
    assert sum("eval_loss" in r for r in read_jsonl(tmp_path / "every 2 steps" / "metrics.jsonl")) == 4


def test_sigterm_saves_a_checkpoint_then_resume_finishes(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    command = [sys.executable, str(REPO_ROOT / "training_scripts" / "pretrain.py"),
               *train_args(corpus, out, "--max_train_steps", "100000")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Stopped by SIGTERM" in stdout
    [checkpoint] = list_checkpoints(out)
    stopped_at = int(checkpoint.name.split("-")[1])
    assert stopped_at >= 2 and not (out / "model.safetensors").exists()

    extra = ("--max_train_steps", str(stopped_at + 2), "--resume_from_checkpoint", "latest")
    other_batch = train_args(corpus, out, *extra, "--gradient_accumulation_steps", "2")
    assert pretrain.main(other_batch) == 2  # the data position would not match: refused
    other_model = train_args(corpus, out, *extra, overrides=TINY.replace("num_hidden_layers=2", "num_hidden_layers=3"))
    assert pretrain.main(other_model) == 2  # another model: refused before any data is read, naming the field
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the model config differs (num_hidden_layers: 2 in the checkpoint, 3 now)" in error
    reset_accelerate_state()
    assert pretrain.main(train_args(corpus, out, *extra)) == 0
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == stopped_at + 2
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(1, stopped_at + 3))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Muon orthogonalizes its update in bf16 (torch.optim.Muon): the last-bit differences of DDP's gradient average
# (another summation order) flip some bf16 roundings, which Newton-Schulz spreads; measured: up to 1.0e-4 after 4
# steps, where one step moves a weight by up to ~1.6e-3 (lr 2e-3 x 0.2 sqrt(64) x |update| <= 2.5).
@pytest.mark.parametrize("optimizer, rtol, atol", [("adamw", 1e-4, 1e-5), ("muon", 1e-2, 5e-4)])
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, corpus, optimizer, rtol, atol):
    one, two = tmp_path / "one", tmp_path / "two"
    steps = ("--max_train_steps", "4", "--optimizer", optimizer)
    assert pretrain.main(train_args(corpus, one, *steps)) == 0  # per-device batch 4, one process
    ddp_args = train_args(corpus, two, *steps)
    ddp_args[ddp_args.index("--per_device_train_batch_size") + 1] = "2"
    # `accelerate launch --cpu --num_processes 2` starts a single process (accelerate issue #2741: multi-CPU
    # goes through mpirun); torchrun workers (`--multi_gpu`) on the CPU (ACCELERATE_USE_CPU) use gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(REPO_ROOT / "training_scripts" / "pretrain.py")]
    result = subprocess.run(launch + ddp_args, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    assert json.loads((two / "training_args.json").read_text())["num_processes"] == 2
    one_weights, two_weights = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=rtol, atol=atol, msg=name)
    one_log, two_log = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [r["loss"] for r in two_log if "loss" in r] == pytest.approx([r["loss"] for r in one_log if "loss" in r],
                                                                         rel=1e-5)
    one_eval, two_eval = (json.loads((d / "eval_results.json").read_text()) for d in (one, two))
    assert two_eval["eval_loss"] == pytest.approx(one_eval["eval_loss"], rel=1e-5)


def test_bf16_autocast_on_cpu_trains_by_default_where_the_probe_finds_it_faster_and_says_so(
        tmp_path, corpus, monkeypatch, capsys):
    """Run outside any launcher on a CPU that reports native bf16, where the timed probe finds bf16 faster: bf16
    autocast, printed with the reason and recorded (training arguments and model card); the weights stay fp32."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # conftest pins the suite to fp32 through it
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "probe_seconds", lambda config, micro_batch: {"no": 0.2, "bf16": 0.1})
    out = tmp_path / "run"
    assert pretrain.main(train_args(corpus, out, "--max_train_steps", "3")) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "mixed precision bf16 (a forward and backward of this model on this CPU took fp32 200.0 ms" in first
    assert json.loads((out / "training_args.json").read_text())["mixed_precision"] == "bf16"
    assert "| `mixed_precision` | `bf16` |" in (out / "README.md").read_text()
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert load_file(out / "model.safetensors")["lm_head.weight"].dtype == torch.float32  # master weights stay fp32


def test_torch_compile_trains_and_saves_plain_weight_names(tmp_path, corpus, monkeypatch):
    """Dynamo's `eager` backend (the launcher's choice via ACCELERATE_DYNAMO_BACKEND): same math, no C++ build."""
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    assert pretrain.main(train_args(corpus, plain, "--max_train_steps", "2")) == 0
    reset_accelerate_state()
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")
    assert pretrain.main(train_args(corpus, compiled, "--max_train_steps", "2", "--torch_compile")) == 0
    plain_weights, compiled_weights = load_file(plain / "model.safetensors"), load_file(compiled / "model.safetensors")
    assert compiled_weights.keys() == plain_weights.keys()  # no torch.compile `_orig_mod.` prefix
    for name in plain_weights:
        torch.testing.assert_close(compiled_weights[name], plain_weights[name], msg=name)


def test_perplexity_metric_against_a_naive_sum():
    nll, tokens, num_bytes = [3.0, 5.5, 0.25], [2, 3, 1], 9
    result = load_metric("perplexity").compute(predictions=nll, references=tokens, num_bytes=num_bytes)
    assert result["loss"] == pytest.approx(8.75 / 6)
    assert result["perplexity"] == pytest.approx(math.exp(8.75 / 6))
    assert result["bits_per_byte"] == pytest.approx(8.75 / math.log(2) / 9)
    assert "bits_per_byte" not in load_metric("perplexity").compute(predictions=nll, references=tokens)


def test_checkpointing_every_epoch(tmp_path, corpus, capsys):
    """`--checkpointing_steps epoch` saves when each epoch's last step completes: after 2 epochs, at E and 2E steps."""
    out = tmp_path / "run"
    assert pretrain.main(train_args(corpus, out, "--num_train_epochs", "2", "--checkpointing_steps", "epoch")) == 0
    steps = json.loads((out / "all_results.json").read_text())["train_steps"]
    assert [path.name for path in list_checkpoints(out)] == [f"checkpoint-{steps // 2}", f"checkpoint-{steps}"]
    with pytest.raises(SystemExit) as exit_info:
        pretrain.parse_args(["--checkpointing_steps", "weekly"])
    assert exit_info.value.code == 2
    assert "expected a positive integer or 'epoch', got 'weekly'" in capsys.readouterr().err


def test_text_column_of_a_json_file(tmp_path, corpus):
    """--text_column names the column in json/csv data; the model trains on that column's text."""
    rows = tmp_path / "rows.jsonl"
    lines = corpus.read_text().splitlines(keepends=True)
    rows.write_text("".join(json.dumps({"id": i, "content": line}) + "\n" for i, line in enumerate(lines)))
    out = tmp_path / "run"
    assert pretrain.main(train_args(rows, out, "--max_train_steps", "2", "--text_column", "content")) == 0
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 2


def test_config_overrides_are_typed_from_the_config_fields():
    parsed = RamanujanConfig.parse_overrides(
        'hidden_size=64,init_scheme=xavier,tie_word_embeddings=true,ramanujan_depth=None,ramanujan_gain=2,'
        'rope_parameters={"rope_type": "default", "rope_theta": 500.0}')
    assert parsed == {"hidden_size": 64, "init_scheme": "xavier", "tie_word_embeddings": True,
                      "ramanujan_depth": None, "ramanujan_gain": 2.0,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    assert isinstance(parsed["ramanujan_gain"], float)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_file", "{tmp}/absent.txt"], "does not exist"),
        (["--train_file", "{tmp}/empty.txt"], "is empty"),
        (["--train_file", "{tmp}/latin1.txt"], "latin1.txt: not UTF-8 text at byte 3"),
        (["--validation_file", "{tmp}/short.txt"], "validation split holds fewer than block_size=32 tokens"),
        (["--block_size", "128"], "exceeds the model's max_position_embeddings (64)"),
        (["--config_overrides", TINY + ",vocab_size=300"], "the tokenizer has 259 tokens but the config's vocab_size is 300"),
        (["--config_name", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--config_overrides", "hidden_sise=64"], "unknown config field 'hidden_sise'"),
        (["--config_overrides", "hidden_size=wide"], "hidden_size='wide' is not a valid int"),
        (["--output_dir", "{tmp}/busy"], "is not empty (another run?)"),
        (["--resume_from_checkpoint", "latest"], "no checkpoint-STEP folder"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer"),
        (["--learning_rate", "nan"], "--learning_rate and --muon_learning_rate must be finite and > 0"),
        (["--muon_learning_rate", "0"], "--learning_rate and --muon_learning_rate must be finite and > 0"),
        (["--adam_beta2", "1"], "--adam_beta1 and --adam_beta2 must be in [0, 1)"),
        (["--min_lr_rate", "1.5"], "--warmup_ratio and --min_lr_rate in [0, 1]"),
        (["--config_overrides", TINY + ',rope_parameters={{"rope_type": "yarn"}}'], "rope_parameters: Missing required keys"),
        (["--config_name", "{tmp}/short.txt"], "is not valid JSON"),
        (["--tokenizer_name", "{tmp}/busy"], "no tokenizer could be loaded from it"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--push_to_hub", "--hub_model_id", "user/tiny"], "--push_to_hub needs a Hugging Face token"),
        (["--tokenizer_name", "{tmp}/absent"], "not a directory holding a saved tokenizer"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(tmp_path, corpus, capsys, monkeypatch, extra, message):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # HF_HOME is a fresh folder (conftest): no stored token either
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("short\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 100)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "config.json").write_text("{}")
    args = train_args(corpus, tmp_path / "run") + [item.format(tmp=tmp_path) for item in extra]
    assert pretrain.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("acx-rt train: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()  # nothing written, not even the lock


def test_push_to_hub_uploads_the_finished_run(tmp_path, corpus, monkeypatch):
    """Through the genuine huggingface_hub client, against the local Hub emulator of test_hub.py."""
    from huggingface_hub import HfApi
    from hub_emulator import HubEmulator
    from test_hub import TOKEN, point_client_at

    hub = HubEmulator(tokens=(TOKEN,)).start()
    try:
        point_client_at(hub, monkeypatch)
        args = train_args(corpus, tmp_path / "run", "--max_train_steps", "1", "--push_to_hub",
                          "--hub_model_id", "test-user/tiny-run")
        assert pretrain.main(args) == 0
        files = set(HfApi().list_repo_files("test-user/tiny-run"))
    finally:
        hub.stop()
    assert {"model.safetensors", "config.json", "modeling_ramanujan.py", "tokenizer_config.json", "README.md"} <= files


def test_push_to_an_unreachable_hub_is_one_line_and_keeps_the_run(tmp_path, corpus, monkeypatch, capsys):
    """A connection that fails (httpx2's TransportError, not an OSError) after training: one line, exit 1, run kept."""
    from hub_emulator import HubEmulator
    from test_hub import TOKEN, point_client_at

    hub = HubEmulator(tokens=(TOKEN,)).start()
    point_client_at(hub, monkeypatch)
    hub.stop()  # nothing listens at its address now
    args = train_args(corpus, tmp_path / "run", "--max_train_steps", "1", "--push_to_hub",
                      "--hub_model_id", "test-user/tiny-run")
    assert pretrain.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("acx-rt train: error: the push to the Hub failed (") and "Traceback" not in "\n".join(err)
    assert (tmp_path / "run" / "model.safetensors").is_file()
