"""Every `acx-rt` command fed a family of bad inputs: each ends with exit status 2 (the one convention for bad input,
acx_ramanujan.commands) and `<command>: error: ...` on the last line of stderr naming the problem, with no traceback,
before any work, and with no file created or changed."""

import json
import logging
import math

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from acx_ramanujan import RamanujanByteTokenizer, RamanujanForCausalLM, cli


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good and broken files, made once: a saved model, broken copies of it, and broken data files."""
    root = tmp_path_factory.mktemp("inputs")
    model_dir = root / "model"
    torch.manual_seed(0)
    RamanujanForCausalLM(tiny_config()).save_pretrained(model_dir)
    RamanujanByteTokenizer().save_pretrained(model_dir)
    weights = (model_dir / "model.safetensors").read_bytes()
    for name, content in {"truncated": weights[: len(weights) // 2], "flipped_header": b"\xff" * 8 + weights[8:]}.items():
        broken = root / name
        broken.mkdir()
        for path in model_dir.iterdir():
            (broken / path.name).write_bytes(content if path.name == "model.safetensors" else path.read_bytes())
    non_finite = root / "non_finite"
    non_finite.mkdir()
    for path in model_dir.iterdir():
        (non_finite / path.name).write_bytes(path.read_bytes())
    tensors = load_file(model_dir / "model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = math.nan
    save_file(tensors, non_finite / "model.safetensors", metadata={"format": "pt"})
    files = {
        "text": "To be, or not to be, that is the question.\n" * 200,
        "binary.txt": bytes(range(256)) * 40,
        "latin1.txt": "caf\xe9 au lait\n".encode("latin-1") * 200,
        "malformed.jsonl": '{"text": "fine"}\n{"text": broken\n',
        "numbers.jsonl": '{"text": 1}\n{"text": 2}\n',
        "malformed.json": '[{"text": "a"}, ',
    }
    for name, content in files.items():
        path = root / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    (root / "text").rename(root / "good.txt")
    return root


def snapshot(root):
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*") if path.is_file()}


# (argv with {in} for the inputs folder and {out} for a fresh output path, text the error line must contain)
CASES = [
    # acx-rt train
    (["train", "--train_file", "{in}/missing.txt", "--output_dir", "{out}"], "missing.txt"),
    (["train", "--train_file", "{in}/binary.txt", "--output_dir", "{out}"], "binary.txt"),
    (["train", "--train_file", "{in}/latin1.txt", "--output_dir", "{out}"], "latin1.txt"),
    (["train", "--train_file", "{in}/malformed.jsonl", "--output_dir", "{out}"], "malformed.jsonl"),
    (["train", "--train_file", "{in}/numbers.jsonl", "--output_dir", "{out}"], "numbers.jsonl"),
    (["train", "--train_file", "{in}/malformed.json", "--output_dir", "{out}"], "malformed.json"),
    (["train", "--learning_rate", "nan", "--output_dir", "{out}"], "learning_rate"),
    (["train", "--config_overrides", "num_experts=four", "--output_dir", "{out}"], "num_experts"),
    (["train", "--config_overrides", "rms_norm_eps=-1", "--output_dir", "{out}"], "rms_norm_eps"),
    (["train", "--config_overrides", "ramanujan_gain=nan", "--output_dir", "{out}"], "ramanujan_gain"),
    (["train", "--config_overrides", "hidden_act=bogus", "--output_dir", "{out}"], "hidden_act"),
    (["train", "--config_overrides", "pad_token_id=400", "--output_dir", "{out}"], "pad_token_id"),
    (["train", "--config_name", "{in}/malformed.json", "--output_dir", "{out}"], "malformed.json"),
    (["train", "--max_train_steps", "-5", "--output_dir", "{out}"], "max_train_steps"),
    (["train", "--block_size", "0", "--output_dir", "{out}"], "block_size"),
    # acx-rt finetune
    (["finetune", "--model_name_or_path", "{in}/nowhere", "--train_file", "{in}/good.txt", "--output_dir", "{out}"], "nowhere"),
    (["finetune", "--model_name_or_path", "{in}/truncated", "--train_file", "{in}/good.txt", "--output_dir", "{out}"], "model.safetensors"),
    (["finetune", "--model_name_or_path", "{in}/flipped_header", "--train_file", "{in}/good.txt", "--output_dir", "{out}"], "model.safetensors"),
    (["finetune", "--model_name_or_path", "{in}/non_finite", "--train_file", "{in}/good.txt", "--output_dir", "{out}"], "non-finite"),
    (["finetune", "--model_name_or_path", "{in}/model", "--train_file", "{in}/latin1.txt", "--output_dir", "{out}"], "latin1.txt"),
    (["finetune", "--model_name_or_path", "{in}/model", "--train_file", "{in}/malformed.jsonl", "--output_dir", "{out}"], "malformed.jsonl"),
    # acx-rt export
    (["export", "--checkpoint", "{in}/truncated", "--output_dir", "{out}"], "model.safetensors"),
    (["export", "--checkpoint", "{in}/non_finite", "--output_dir", "{out}"], "non-finite"),
    (["export", "--checkpoint", "{in}/model", "--format", "bogus", "--output_dir", "{out}"], "bogus"),
    (["export", "--checkpoint", "{in}/model", "--opset", "5", "--output_dir", "{out}"], "opset"),
    # acx-rt visualize
    (["visualize", "--checkpoint", "{in}/truncated", "--output_dir", "{out}"], "model.safetensors"),
    (["visualize", "--checkpoint", "{in}/nowhere", "--output_dir", "{out}"], "nowhere"),
    # acx-rt push (offline: every one of these must stop before any network call)
    (["push", "{in}/nowhere", "user/repo"], "nowhere"),
    (["push", "{in}/non_finite", "user/repo"], "non-finite"),
    (["push", "{in}/truncated", "user/repo"], "model.safetensors"),
    # acx-rt verify / compare-init / grid-report / bench-speed / tokenizer
    (["verify", "--depth", "0", "--output_dir", "{out}"], "depth"),
    (["verify", "--depth", "2", "--text_file", "{in}/missing.txt", "--output_dir", "{out}"], "missing.txt"),
    (["compare-init", "--layers", "x", "--train_file", "{in}/good.txt", "--max_train_steps", "2", "--output_dir", "{out}"], "layers"),
    (["compare-init", "--seeds", "0", "--train_file", "{in}/good.txt", "--max_train_steps", "2", "--output_dir", "{out}"], "seeds"),
    (["compare-init", "--schemes", "normal", "--layers", "1", "--train_file", "{in}/latin1.txt", "--max_train_steps", "2", "--output_dir", "{out}"], "latin1.txt"),
    (["grid-report", "{in}/nowhere"], "nowhere"),
    (["grid-report", "{in}/model"], "not a compare-init --output_dir"),
    (["bench-speed", "--threads", "0", "--output", "{out}/speed.json"], "threads"),
    (["tokenizer", "train", "--files", "{in}/latin1.txt", "--vocab_size", "300", "--output_dir", "{out}"], "latin1.txt"),
]


@pytest.mark.parametrize("argv, names", CASES, ids=lambda value: " ".join(value)[:70] if isinstance(value, list) else None)
def test_bad_input_is_one_error_line_and_changes_nothing(inputs, tmp_path, capsys, monkeypatch, argv, names):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Libraries' loggers keep the stderr of the test that first imported them, which pytest has closed since; logging
    # would print a "Logging error" traceback of its own. What our commands print goes to the captured stderr.
    monkeypatch.setattr(logging, "raiseExceptions", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [arg.replace("{in}", str(inputs)).replace("{out}", str(out)) for arg in argv]
    before = snapshot(inputs)
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors: usage, then one error line
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last, err
    assert names in last, err
    assert not out.exists(), f"{out} was created"
    assert snapshot(inputs) == before
    assert not [path for path in tmp_path.iterdir() if path.name != "out"], "files left in the working directory"


def test_the_table_covers_every_command():
    assert {argv[0] for argv, _ in CASES} == set(cli.SUBCOMMANDS)
    assert json.dumps(CASES)  # the table stays plain data
