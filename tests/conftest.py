"""Shared fixtures: tiny configs, a text corpus from inside the package, and an isolated HF cache for every test session."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def _throwaway_folder(prefix: str) -> str:
    """A temporary folder removed when this test process exits, so that a test run leaves nothing behind."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# Nothing may be fetched from the Hub; remote-code modules go to a throwaway cache.
os.environ.setdefault("HF_HOME", _throwaway_folder("acx-hf-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `acx-rt train` picks its precision by the hardware (and on CPUs with native bf16 by a timed probe), unless the
# launcher says otherwise (training/precision.py):
# the suite says fp32, so that its numbers are the same on every machine; tests of the bf16 default unset it.
os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "no")
# ... and the probe's cache of those tests goes to a temporary folder, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = _throwaway_folder("acx-cache-")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A real text file of ~466 kB: the corpus `acx-rt train` embeds (Python's help text), so no test needs ../shared."""
    from acx_ramanujan.training.data import default_corpus_text

    path = tmp_path_factory.mktemp("corpus") / "python-help.txt"
    path.write_text(default_corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """3 kB of the same text: about 85 train blocks of 32 bytes (about 22 batches of 4; the text varies a little
    between Python builds) and 9 validation blocks, for the many short `acx-rt train` runs."""
    from acx_ramanujan.training.data import default_corpus_text

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(default_corpus_text()[:3000], encoding="utf-8")
    return path


@pytest.fixture
def kernels_on_a_fake_gpu(monkeypatch):
    """Resolve Hub kernels as on an H100 (CUDA capability 9.0), with no GPU and no download: each kernel the mapping
    names "loads" as a stand-in that records its layer name and runs the module's own forward. Yields the names run.
    Skips where the `kernels` package is missing (Transformers depends on it from 5.25)."""
    kernels = pytest.importorskip("kernels", reason="needs `kernels`, a dependency of Transformers from 5.25")
    import importlib
    import inspect

    from transformers.integrations import hub_kernels

    # the module that loads kernel layers: kernels.layer.layer in 0.18, kernels._internals.layer.layer in 0.19
    kernel_layers = importlib.import_module(kernels.use_kernel_forward_from_hub.__module__)

    run = []

    def stand_in(repo, module_class):
        def forward(self, *args, **kwargs):
            run.append(repo.layer_name)
            return module_class.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(module_class.forward)  # kernels checks the forward's signature
        # can_torch_compile, has_backward: flags kernels reads (0.18 refuses compile modes without them)
        members = {"forward": forward, "can_torch_compile": True, "has_backward": True}
        return type(f"StandIn{repo.layer_name}", (torch.nn.Module,), members)

    monkeypatch.setattr(kernel_layers, "_get_layer_memoize", stand_in)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(hub_kernels, "get_device_type", lambda device=None: "cuda")  # where the model "is"
    return run


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so that the next in-process run builds its own Accelerator
    (mixed precision, process count, FSDP plugin) from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """For modules of in-process runs: `pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def tiny_config(**overrides):
    """A 2-layer width-32 config: fast enough for every test."""
    from acx_ramanujan import RamanujanConfig

    values = dict(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    values.update(overrides)
    return RamanujanConfig(**values)


def tiny_moe_config(**overrides):
    values = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    values.update(overrides)
    return tiny_config(**values)


def random_model(config, seed=0):
    """A random model of `config` whose RMSNorm weights (the q/k norms too) are drawn away from their initial ones, so
    that an export or conversion must map each of them right."""
    from acx_ramanujan import RamanujanForCausalLM

    torch.manual_seed(seed)
    model = RamanujanForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def save_checkpoint(directory, config, tokenizer=None, seed=0):
    """`random_model(config, seed)` saved with `tokenizer` (the byte tokenizer by default) as a checkpoint in
    `directory`."""
    from acx_ramanujan import RamanujanByteTokenizer

    random_model(config, seed).save_pretrained(directory)
    (tokenizer or RamanujanByteTokenizer()).save_pretrained(directory)
    return directory


def export_llama(tmp_path, model, tokenizer=None) -> tuple[Path, Path]:
    """Save `model` with `tokenizer` (the byte tokenizer by default) as a checkpoint under `tmp_path` and export it with
    `acx-rt export --format llama`: (the checkpoint, the exported folder)."""
    from acx_ramanujan import RamanujanByteTokenizer, export

    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    (tokenizer or RamanujanByteTokenizer()).save_pretrained(checkpoint)
    output_dir = tmp_path / "llama"
    assert export.main(["--checkpoint", str(checkpoint), "--format", "llama", "--output_dir", str(output_dir)]) == 0
    return checkpoint, output_dir


# A fresh interpreter in which `acx_ramanujan` cannot be imported: what a user without the package sees.
_BLOCK_PACKAGE = """
import importlib.abc, sys
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "acx_ramanujan" or name.startswith("acx_ramanujan."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _Blocker())
try:
    import acx_ramanujan
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("acx_ramanujan is still importable")
"""


def run_without_package(code: str, cwd, extra_env: dict | None = None, timeout: int = 240):
    """Run `code` in a new Python process (cwd outside the repo, offline, private HF cache) with the package blocked.

    Returns the CompletedProcess; raises AssertionError with the child's stderr if it failed.
    """
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(Path(cwd) / "hf_home")}
    env.pop("PYTHONPATH", None)
    env.update(extra_env or {})
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_PACKAGE + code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"child failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr[-4000:]}"
    return result
