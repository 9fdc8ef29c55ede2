"""`--mixed_precision auto` (acx_ramanujan/training/precision.py): the launcher's choice, the hardware's, and on a
CPU with native bf16 the faster precision of a timed probe, cached per machine and shape."""

import json

import pytest
import torch

from acx_ramanujan import RamanujanConfig
from acx_ramanujan.training import precision

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY = RamanujanConfig.from_preset("tiny", **SHAPE)


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A plain run (no launcher, no GPU) on a CPU whose bf16 support the test sets; the cache in a fresh folder;
    the probe's timings faked (`machine.timings`) and its calls counted."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)

    class Machine:
        native, timings, probes = True, {"no": 0.100, "bf16": 0.050}, []

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: Machine.native)

    def fake_probe(config, micro_batch, steps=precision.PROBE_STEPS):
        Machine.probes.append((config.hidden_size, micro_batch))
        return dict(Machine.timings)

    monkeypatch.setattr(precision, "probe_seconds", fake_probe)
    return Machine


@pytest.mark.parametrize(("bf16_seconds", "expected"), [(0.050, "bf16"), (0.0899, "bf16"), (0.0901, "no"), (0.3, "no")])
def test_bf16_is_taken_on_a_native_cpu_only_when_the_probe_finds_it_10_percent_faster(machine, bf16_seconds, expected):
    machine.timings = {"no": 0.100, "bf16": bf16_seconds}
    chosen = precision.choose_precision("auto", TINY, (12, 64))
    assert chosen.value == expected and machine.probes == [(32, (12, 64))]
    assert "fp32 100.0 ms" in chosen.reason and "probed now" in chosen.reason


def test_the_probe_is_cached_per_shape_and_micro_batch_so_a_rerun_trains_alike(machine, tmp_path):
    first = precision.choose_precision("auto", TINY, (12, 64))
    machine.timings = {"no": 0.100, "bf16": 0.500}  # a rerun on a busy machine would decide otherwise
    again = precision.choose_precision("auto", TINY, (12, 64))
    assert (first.value, again.value) == ("bf16", "bf16") and "cached" in again.reason
    assert len(machine.probes) == 1
    precision.choose_precision("auto", TINY, (8, 256))  # another micro-batch: probed
    wider = RamanujanConfig.from_preset("tiny", **{**SHAPE, "hidden_size": 64})
    assert precision.choose_precision("auto", wider, (12, 64)).value == "no"  # another shape: probed
    assert machine.probes[1:] == [(32, (8, 256)), (64, (12, 64))]
    cache = json.loads((tmp_path / "cache" / "acx-ramanujan" / precision.CACHE_FILE).read_text())
    assert len(cache) == 3


def test_a_damaged_cache_is_probed_again(machine, tmp_path):
    cache = tmp_path / "cache" / "acx-ramanujan" / precision.CACHE_FILE
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    assert precision.choose_precision("auto", TINY, (12, 64)).value == "bf16" and len(machine.probes) == 1
    cache.write_text(json.dumps({precision.probe_key(TINY, (12, 64)): {"no": "fast"}}))
    assert precision.choose_precision("auto", TINY, (12, 64)).value == "bf16" and len(machine.probes) == 2


@pytest.mark.parametrize(("choice", "launcher", "cuda", "native", "expected"), [
    ("auto", None, False, False, "no"),  # emulated bf16: fp32, nothing probed
    ("auto", None, True, False, "bf16"),  # a GPU with bf16 (the CPU does not matter)
    ("auto", "no", False, True, "no"), ("auto", "BF16", False, False, "bf16"),  # under `accelerate launch`
    ("no", "bf16", False, True, "no"), ("bf16", None, False, False, "bf16")])  # the flag, whatever else
def test_without_a_probe_the_flag_the_launcher_or_the_hardware_decides(machine, monkeypatch, choice, launcher, cuda,
                                                                      native, expected):
    machine.native = native
    if launcher is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: cuda)
    assert precision.choose_precision(choice, TINY, (12, 64)).value == expected
    assert machine.probes == []
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # told to train on the CPU: the CPU decides, not the GPU beside it
    if (choice, launcher, cuda, native) == ("auto", None, True, False):
        assert precision.choose_precision(choice, TINY, (12, 64)).value == "no"


def test_the_real_probe_times_both_precisions_and_leaves_the_random_state_alone():
    """The run draws its weights and data order after the probe: the probe must not move the global RNG."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    seconds = precision.probe_seconds(TINY, (2, 16), steps=1)
    assert set(seconds) == {"no", "bf16"} and all(0 < value < 60 for value in seconds.values())
    assert torch.equal(torch.get_rng_state(), before)


def test_the_real_probe_times_new_tokens_every_pass_the_same_for_both_precisions(monkeypatch):
    """An MoE layer's expert matmuls change shape with the routing, and a bf16 matmul of a new shape builds its kernel
    first: a probe that repeated one batch timed cached kernels only and took bf16 where training was slower."""
    seen = []
    forward = precision.RamanujanForCausalLM.forward

    def recording_forward(self, input_ids=None, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), input_ids.clone()))
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(precision.RamanujanForCausalLM, "forward", recording_forward)
    precision.probe_seconds(TINY, (2, 16), steps=2)
    assert [autocast for autocast, _ in seen] == [False, True] * 3  # a warm-up round, then 2 timed, interleaved
    rounds = [(seen[i][1], seen[i + 1][1]) for i in range(0, len(seen), 2)]
    assert all(torch.equal(fp32, bf16) for fp32, bf16 in rounds)
    assert len({tuple(fp32.flatten().tolist()) for fp32, _ in rounds}) == 3
