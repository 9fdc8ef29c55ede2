"""`transformers serve` on an `acx-rt export --format llama` folder answers as our model does: an OpenAI-style chat
completion, a streamed one and `transformers chat` all give the text of our greedy `generate()` on the same templated
prompt. A remote-code checkpoint does not serve, even with `--trust-remote-code` (README, Serve), for the reason the
README quotes: the server builds models with `getattr(transformers, config.architectures[0])`."""

import json
import os
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import pytest
import torch
from conftest import export_llama, tiny_config
from openai import OpenAI
from transformers import AutoTokenizer

from acx_ramanujan import RamanujanByteTokenizer, RamanujanForCausalLM

MESSAGES = [{"role": "user", "content": "Hello"}]
NEW_TOKENS = 12
# `transformers serve` answered /health 10 to 35 s after its start on the shared 2-core machine (35 s the first time
# after the install); a request took well under a second on the tiny model.
READY_WITHIN_S, REQUEST_TIMEOUT_S = 180, 60
# The line of transformers/cli/serving/model_manager.py (5.23 and 5.25) that refuses a class outside `transformers`.
BLOCKING_LINE = "architecture = getattr(transformers, config.architectures[0])"
# `python -m transformers.cli.transformers` runs the `transformers` console script's `main`, from this interpreter.
TRANSFORMERS_CLI = [sys.executable, "-m", "transformers.cli.transformers"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny dense model exported as Llama: (folder holding `checkpoint` and `llama`, the text our model generates
    greedily for MESSAGES through our chat template, decoded with the exported tokenizer).

    Random weights emit random bytes: a trailing partial UTF-8 character, which the server's streaming detokenizer
    holds back, and `<word>`, which `transformers chat` escapes for Markdown, would make the three texts differ by
    what the clients do. So the head scores only ASCII letters and space: every other row is zero, and the largest
    of 53 random logits is positive (the others stay possible, with probability 2^-53 per step). The rest of the
    model is untouched, including the attention temperature that the export folds into q_proj (α = 0.3)."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = RamanujanForCausalLM(tiny_config(attention_scale_alpha=0.3)).eval()
    allowed = torch.tensor([ord(character) for character in string.ascii_letters + " "])
    with torch.no_grad():
        model.lm_head.weight[~torch.isin(torch.arange(model.config.vocab_size), allowed)] = 0
    _, directory = export_llama(root, model)

    prompt = RamanujanByteTokenizer().apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        tokens = model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    text = AutoTokenizer.from_pretrained(directory).decode(tokens, skip_special_tokens=True)
    assert len(text) == NEW_TOKENS, f"our model stopped early or left the letters: {text!r}"
    return root, text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def transformers_serve(model: str, cwd, *flags):
    """`transformers serve model` on 127.0.0.1 (a free port), offline, with a private HF cache, in a process group of
    its own; yields (process, base URL, log file). The group (the server and the model process it spawns) is
    terminated on the way out, whatever happened, and killed if it is still there 15 s later."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), "OMP_NUM_THREADS": "1"}
    log = cwd / f"serve-{port}.log"
    command = [*TRANSFORMERS_CLI, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *flags]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process, f"http://127.0.0.1:{port}", log
    finally:
        for stop, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(process.pid, stop)
                process.wait(wait_s)
                break
            except ProcessLookupError:  # the group is gone already
                break
            except subprocess.TimeoutExpired:
                continue


def ready(process, base_url: str, log) -> bool:
    """Polls /health until the server answers (True) or exits (False); fails after READY_WITHIN_S."""
    deadline = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:  # not listening yet
            pass
        time.sleep(0.25)
    pytest.fail(f"transformers serve not ready within {READY_WITHIN_S} s:\n{log.read_text()[-3000:]}")


def test_served_export_answers_as_our_greedy_generation(exported):
    root, expected = exported
    model = "./llama"  # a local path, as a user passes it; the server's cwd is `root`
    with transformers_serve(model, root) as (process, base_url, log):
        assert ready(process, base_url, log), f"transformers serve exited:\n{log.read_text()[-3000:]}"
        client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        # temperature 0 makes the server set do_sample=False (BaseHandler._build_generation_kwargs); max_tokens becomes
        # max_new_tokens.
        settings = dict(model=model, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0)

        completion = client.chat.completions.create(**settings)
        assert completion.choices[0].message.content == expected
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == NEW_TOKENS

        # The role chunk, at most one chunk per token, the finish chunk: no more are read.
        with client.chat.completions.create(**settings, stream=True) as stream:
            chunks = [chunk for _, chunk in zip(range(NEW_TOKENS + 2), stream)]
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert streamed == expected
        assert chunks[-1].choices[0].finish_reason == "length"

        # `transformers chat` reads stdin: the message, "n" to "Continue generating?" (it stopped at the length limit),
        # then `!save` (to chats/<model>/chat_<time>.json) and `!exit`. huggingface_hub's offline mode blocks every
        # request its client makes, the local server's included, so HF_HUB_OFFLINE is left out here; HF_ENDPOINT points
        # at a closed local port, so that nothing could reach the Hub.
        env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
        env.update(HF_HOME=str(root / "hf_home"), HF_ENDPOINT="http://127.0.0.1:9")
        chat = subprocess.run(
            [*TRANSFORMERS_CLI, "chat", model, base_url, "do_sample=False", f"max_new_tokens={NEW_TOKENS}",
             "--save-folder", "chats", "--user", "tester"],
            input=f"{MESSAGES[0]['content']}\nn\n!save\n!exit\n", cwd=root, env=env, capture_output=True, text=True,
            timeout=REQUEST_TIMEOUT_S,
        )
        assert chat.returncode == 0, chat.stdout[-3000:] + chat.stderr[-3000:]
        saved = list((root / "chats").rglob("chat_*.json"))
        assert len(saved) == 1, chat.stdout[-3000:]
        history = json.loads(saved[0].read_text())["chat_history"]
        assert history == [*MESSAGES, {"role": "assistant", "content": expected}]


def test_remote_code_checkpoint_does_not_serve(exported):
    """With `--trust-remote-code` the config and tokenizer load, and the model does not: the server exits, naming our
    class and BLOCKING_LINE. When a release serves it, this fails: then test it as above and update the README."""
    root, _ = exported
    with transformers_serve("./checkpoint", root, "--trust-remote-code") as (process, base_url, log):
        assert not ready(process, base_url, log), "transformers serve now serves remote code: README's Serve is stale"
        output = log.read_text()
    assert process.returncode != 0
    assert "module transformers has no attribute RamanujanForCausalLM" in output, output[-3000:]
    assert BLOCKING_LINE in output, output[-3000:]
