"""`acx-rt finetune` argument checks in finetune_trainer: --output_dir required, --resume_from_checkpoint checked.

Each bad input is one `acx-rt finetune: error:` line, exit status 2, before any model is loaded or file written.
"""

import json

import pytest
import torch
from conftest import tiny_config

from acx_ramanujan import RamanujanForCausalLM
from acx_ramanujan.training.finetune import parse_arguments
from acx_ramanujan.training.causal_lm import DataArguments, main
from acx_ramanujan.tokenization_ramanujan import RamanujanByteTokenizer

QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0", "--max_steps", "1",
         "--save_strategy", "no", "--block_size", "32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    RamanujanForCausalLM(tiny_config()).save_pretrained(directory)
    RamanujanByteTokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox jumps over the dog"}) + "\n" for i in range(80)))
    return str(path)


def assert_one_error_line(capsys, status, message):
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error and error[-1].startswith("acx-rt finetune: error: ") and message in error[-1], error
    assert not any("Traceback" in line for line in error)


def test_missing_output_dir_is_refused_instead_of_writing_trainer_output(checkpoint, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status = main(["--model_name_or_path", checkpoint, "--train_file", text_file, *QUIET])
    assert_one_error_line(capsys, status, "--output_dir is required")
    assert list(tmp_path.iterdir()) == []  # no ./trainer_output


def test_missing_output_dir_in_a_json_argument_file_is_refused(checkpoint, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    arguments = tmp_path / "args.json"
    arguments.write_text(json.dumps({"model_name_or_path": checkpoint, "train_file": text_file, "max_steps": 1,
                                     "report_to": "none", "use_cpu": True, "save_strategy": "no", "block_size": 32}))
    assert_one_error_line(capsys, main([str(arguments)]), "--output_dir is required")
    assert [path.name for path in tmp_path.iterdir()] == ["args.json"]
    arguments.write_text("{not json")
    assert_one_error_line(capsys, main([str(arguments)]), "args.json is not a readable JSON file of arguments")


@pytest.mark.parametrize("flag", ["--output_dir", "--output-dir"])
@pytest.mark.parametrize("value", ["out", "trainer_output"])  # even TrainingArguments' default name, when given
def test_a_given_output_dir_is_accepted(flag, value):
    parsed = parse_arguments(DataArguments, ["--model_name_or_path", "m", "--train_file", "t.txt", flag, value], "prog")
    assert parsed[3].output_dir == value


@pytest.mark.parametrize(
    "resume, message",
    [
        ("{tmp}/nonexistent", "--resume_from_checkpoint {tmp}/nonexistent is not a directory"),
        ("{checkpoint}", "--resume_from_checkpoint {checkpoint} is not a Trainer checkpoint: it has no trainer_state.json"),
    ],
)
def test_resume_from_a_non_checkpoint_is_one_line(checkpoint, text_file, tmp_path, capsys, resume, message):
    resume, message = (text.format(tmp=tmp_path, checkpoint=checkpoint) for text in (resume, message))
    output = tmp_path / "out"
    status = main(["--model_name_or_path", checkpoint, "--train_file", text_file, "--output_dir", str(output),
                   "--resume_from_checkpoint", resume, *QUIET])
    assert_one_error_line(capsys, status, message)
    assert not output.exists()


@pytest.mark.parametrize("use_lora", [False, True])
def test_resume_from_another_models_checkpoint_names_the_tensor(checkpoint, text_file, tmp_path, capsys, use_lora):
    """A Trainer checkpoint of a wider model (or its LoRA adapter) does not fit: one line naming a tensor, no training."""
    lora = ["--use_lora", "--lora_r", "4"] if use_lora else []
    wide = tmp_path / "wide"
    RamanujanForCausalLM(tiny_config(hidden_size=64)).save_pretrained(wide)
    RamanujanByteTokenizer().save_pretrained(wide)
    first = tmp_path / "first"
    assert main(["--model_name_or_path", str(wide), "--train_file", text_file, "--output_dir", str(first), *lora,
                 *QUIET, "--save_strategy", "steps", "--save_steps", "1"]) == 0
    saved = first / "checkpoint-1"
    assert (saved / "trainer_state.json").is_file()

    output = tmp_path / "out"
    status = main(["--model_name_or_path", checkpoint, "--train_file", text_file, "--output_dir", str(output), *lora,
                   "--resume_from_checkpoint", str(saved), *QUIET])
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(f"acx-rt finetune: error: --resume_from_checkpoint {saved} is from another model: ")
    assert " has shape [" in error[-1] and " there and [" in error[-1] and not any("Traceback" in line for line in error)
    assert not (output / "model.safetensors").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hub_strategy", "checkpoint"], "--hub_strategy checkpoint is not supported: --push_to_hub uploads the finished model once"),
        (["--use_lora"], "--push_to_hub with --use_lora needs --merge_lora"),
        (["--hub_model_id", "not a/valid id"], "--hub_model_id 'not a/valid id' is not a valid repo id"),
        (["--no-token"], "--push_to_hub needs a Hugging Face token: --hub_token, HF_TOKEN or `hf auth login`"),
        (["--do_eval"], "--push_to_hub needs --do_train"),
    ],
    ids=["checkpoint strategy", "lora without merge", "bad repo id", "no token", "evaluation only"],
)
def test_push_settings_that_cannot_be_honoured_are_refused_before_any_work(checkpoint, text_file, tmp_path, capsys,
                                                                            monkeypatch, flags, message):
    """--push_to_hub goes through acx-rt's own push at the end of the run (Trainer never pushes): what that push
    cannot do is refused before anything is loaded or written."""
    if flags == ["--no-token"]:
        flags = []
        monkeypatch.delenv("HF_TOKEN", raising=False)  # conftest's HF_HOME holds no stored token
    else:
        monkeypatch.setenv("HF_TOKEN", "hf_some_token")
    output = tmp_path / "out"
    status = main(["--model_name_or_path", checkpoint, "--train_file", text_file, "--output_dir", str(output),
                   "--push_to_hub", *flags, *QUIET])
    assert_one_error_line(capsys, status, message)
    assert not output.exists()
