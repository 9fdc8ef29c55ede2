"""benchmarks/gpu_check.sh: every part that a CPU can run, run here, so the first GPU session is not lost to a typo."""

import contextlib
import datetime
import subprocess
from pathlib import Path

import pytest
import torch

from acx_ramanujan.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_attention_backends_agree_on_real_tokens():
    results = gpu_check.attention_backends("cpu", torch.float32)
    for kind in ("dense", "moe"):
        assert results[f"{kind}/sdpa"]["max_abs_logit_diff"] < 1e-5
        assert results[f"{kind}/sdpa"]["max_rel_grad_diff"] < 1e-4


def test_bf16_training_tracks_fp32():
    results = gpu_check.bf16_training("cpu", steps=3)
    assert results["all_finite"] and results["max_loss_gap"] < 0.05


def test_static_compiled_generation_equals_dynamic_eager():
    """The hardest path (MoE dispatch inside a fullgraph compile); the dense and Llama runs share its code."""
    results = gpu_check.static_compiled_generation("cpu", new_tokens=4, repeats=1, kinds=("moe",))
    assert results["moe"].get("tokens_equal") is True, results


def test_fsdp2_step_equals_the_plain_step():
    # Another job's store on the port the check once hard-coded (29517, as a concurrent test run holds it) must
    # not break the check.
    with contextlib.suppress(RuntimeError):  # already taken by someone else: the same condition
        held = torch.distributed.TCPStore("127.0.0.1", 29517, 1, True, timeout=datetime.timedelta(seconds=5))
    results = gpu_check.fsdp_step("cpu")
    for kind in ("dense", "moe"):
        assert results[kind]["parameters_are_dtensors"]
        assert results[kind]["loss"]["plain"] == pytest.approx(results[kind]["loss"]["fsdp"], abs=1e-6)
        assert results[kind]["max_weight_diff_after_step"] < 1e-6


def test_training_throughput_reports_both_models():
    results = gpu_check.training_throughput("cpu", width=64, layers=1, context=16, batch=2, repeats=1)
    for name in ("ours", "llama"):
        assert results[name]["tokens_per_s"] > 0 and 0 < results[name]["mfu_vs_measured_peak"]


def test_continuous_batching_equals_generate():
    results = gpu_check.continuous_batching("cpu", new_tokens=3)
    assert set(results) == {f"{kind}/{label}" for kind in ("dense", "moe") for label in ("default", "cuda_graphs")}
    assert all(result.get("tokens_equal") is True for result in results.values()), results


def test_hub_kernels_report_what_from_pretrained_applied(kernels_on_a_fake_gpu):
    """With kernels resolved as on a GPU (stand-ins that run the torch forward): ours got the kernels Llama got."""
    results = gpu_check.hub_kernels("cpu")
    assert results["same_kernels_as_llama"] is True, results
    for name in ("ours", "ours_moe", "llama"):
        assert results[name]["max_abs_logit_diff_vs_torch"] == 0.0
    assert bool(results["ours"]["applied"]) == bool(results["llama"]["applied"]) == results["llama"]["use_kernels"]


def test_cuda_request_without_cuda_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU-only machine reports
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_launcher_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
