"""benchmarks/time_to_target.py and its peer, benchmarks/peer_llama.py: the peer trains and is scored on the same
validation blocks as `acx-rt train`, and the time to target is read right from both kinds of log."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acx_ramanujan import RamanujanByteTokenizer
from acx_ramanujan.training.data import text_to_dataset, tokenize_and_pack

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


time_to_target, peer = load("time_to_target"), load("peer_llama")


def test_ours_curve_sums_the_seconds_of_the_steps_before_each_evaluation(tmp_path):
    records = [{"step": 1, "loss": 5.0, "tokens_per_second": 100.0}, {"step": 2, "loss": 4.0, "tokens_per_second": 50.0},
               {"step": 2, "eval_loss": 3.5, "perplexity": 33.1}, {"step": 3, "loss": 3.0, "tokens_per_second": 200.0},
               {"step": 3, "eval_loss": 3.0, "perplexity": 20.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # 100 tokens per step, as acx-rt train records its batch (a variant may train with another than the anchor's)
    (tmp_path / "training_args.json").write_text(json.dumps(
        {"block_size": 10, "per_device_train_batch_size": 5, "gradient_accumulation_steps": 2}))
    curve = time_to_target.ours_curve(tmp_path)
    assert curve == [{"step": 2, "train_seconds": pytest.approx(1.0 + 2.0), "eval_loss": 3.5},
                     {"step": 3, "train_seconds": pytest.approx(1.0 + 2.0 + 0.5), "eval_loss": 3.0}]
    assert time_to_target.first_reaching(curve, 3.2) == curve[1]
    assert time_to_target.first_reaching(curve, 3.5) == curve[0]  # "reaches" includes equal
    assert time_to_target.first_reaching(curve, 2.9) is None


def test_report_takes_each_seeds_target_from_its_llama_adamw_run():
    args = time_to_target.parse_args(["--train_file", __file__, "--out", "unused", "--seeds", "1", "2",
                                      "--runs", "llama-adamw", "ours-dense"])
    curves = {("llama-adamw", 1): [{"step": 10, "train_seconds": 10.0, "eval_loss": 2.0}],
              ("ours-dense", 1): [{"step": 5, "train_seconds": 4.0, "eval_loss": 2.5},
                                  {"step": 10, "train_seconds": 8.0, "eval_loss": 1.9}],
              ("llama-adamw", 2): [{"step": 10, "train_seconds": 20.0, "eval_loss": 1.5}],
              ("ours-dense", 2): [{"step": 10, "train_seconds": 8.0, "eval_loss": 1.6}]}
    rows = time_to_target.report(args, curves).splitlines()[2:]
    assert rows[1].split(" | ")[1:8] == ["1", "2.0000", "1.9000", "8.0", "10", "8.0", "0.80"]
    assert "not reached" in rows[3] and rows[3].split(" | ")[2] == "1.5000"


def test_variants_and_bad_runs_are_checked_before_anything_trains(capsys):
    args = time_to_target.parse_args(["--train_file", __file__, "--out", "x", "--variant", "fp32=tiny:--mixed_precision no"])
    assert args.commands["fp32"] == ("ours", "tiny", "--mixed_precision no") and "fp32" in args.runs
    command = time_to_target.command(args, "fp32", 7, Path("out"))
    assert command[command.index("--seed") + 1] == "7" and command[-2:] == ["--mixed_precision", "no"]
    for bad in (["--runs", "nonsense"], ["--runs", "ours-dense"], ["--variant", "no-preset"]):
        with pytest.raises(SystemExit):
            time_to_target.parse_args(["--train_file", __file__, "--out", "x", *bad])
    assert "unknown run" in capsys.readouterr().err


def test_peer_schedule_is_nanogpts():
    """Linear warmup over 100 steps, then cosine from the peak to 1e-4 at the last step."""
    assert peer.lr_factor(0, 2000, 1e-3) == pytest.approx(1 / 101)
    assert peer.lr_factor(99, 2000, 1e-3) == pytest.approx(100 / 101)
    assert peer.lr_factor(100, 2000, 1e-3) == pytest.approx(1.0)
    assert peer.lr_factor(1050, 2000, 1e-3) == pytest.approx((1e-4 + 0.5 * (1e-3 - 1e-4)) / 1e-3)
    assert peer.lr_factor(2000, 2000, 1e-3) == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_peer_trains_llama_and_scores_acx_rt_trains_validation_blocks(tmp_path, optimizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: to be, or not to be, that is the question.\n" for i in range(200)))
    log = tmp_path / "curve.jsonl"
    subprocess.run([sys.executable, str(BENCHMARKS / "peer_llama.py"), "--train_file", str(corpus), "--log", str(log),
                    "--optimizer", optimizer, "--max_train_steps", "6", "--eval_steps", "3", "--block_size", "16",
                    "--batch_size", "4"], check=True, capture_output=True)
    curve = [json.loads(line) for line in log.read_text().splitlines()]
    assert [point["step"] for point in curve] == [3, 6] and curve[1]["train_seconds"] > curve[0]["train_seconds"] > 0
    assert curve[1]["eval_loss"] < curve[0]["eval_loss"] < 6  # it learns (ln 259 = 5.56 at chance)
    # The blocks it scored are the ones acx-rt train validates on: the tail split, packed into 16-byte blocks.
    blocks = tokenize_and_pack(text_to_dataset(corpus.read_text()), RamanujanByteTokenizer(), 16)["validation"]
    _, validation = peer.load_data(str(corpus), 16)
    assert torch.equal(validation, torch.tensor(blocks["input_ids"]))
