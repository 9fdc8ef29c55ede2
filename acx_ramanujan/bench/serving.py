"""One greedy generation call timed token by token, through Transformers' `generate()` and through llama.cpp.

What a user waits for splits in two: the prompt pass with the first token, then one decode step per further token.
Both engines are timed at the same two points, the same way: the clock starts before the call, and each new token
is stamped when the engine hands it to the caller (`generate()`'s streamer; llama-cpp-python's `Llama.generate`
yields it). The last token is not fed back on either side. llama.cpp's own counters (`llama_perf_context`) would
time only its decode calls, without the sampler and the Python bindings a caller also waits for; one wall clock on
both sides compares what a caller gets.
"""

import ctypes
import importlib.metadata
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers.generation.streamers import BaseStreamer

# module: what pip installs it as. gguf writes the file (the [export] extra); llama-cpp-python compiles llama.cpp.
LLAMA_CPP_PACKAGES = {"llama_cpp": "llama-cpp-python", "gguf": "gguf"}


@dataclass
class Timeline:
    """perf_counter seconds of one call: its start, each new token's arrival, its end; and the tokens."""

    tokens: list[int]
    start: float
    token_times: list[float]
    end: float

    @property
    def first_token_s(self) -> float:
        """The prompt pass and the first new token (time to first token)."""
        return self.token_times[0] - self.start

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens 2..n: one decode step each."""
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])

    @property
    def tokens_per_s(self) -> float:
        """End to end: every new token over the whole call, prompt pass included."""
        return len(self.tokens) / (self.end - self.start)


class TokenClock(BaseStreamer):
    """A `generate()` streamer that stamps each new token (Transformers' own streamers print or queue text; none
    keeps times). `generate()` first puts the prompt (not stamped), then each step's tokens (batch 1: one)."""

    def start(self) -> None:
        self.started, self.times, self.tokens, self.prompt_seen = time.perf_counter(), [], [], False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
            self.tokens.append(int(value))
        self.prompt_seen = True

    def end(self) -> None:
        pass


def clocked(run: Callable[[], object], clock: TokenClock) -> Callable[[], Timeline]:
    """`run` (a `generate()` call streaming into `clock`) as a call that returns its Timeline."""

    def call() -> Timeline:
        clock.start()
        run()
        return Timeline(clock.tokens, clock.started, clock.times, time.perf_counter())

    return call


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here, in one line; None when it can."""
    missing = [pip for module, pip in LLAMA_CPP_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return f"llama.cpp rows not run: {' and '.join(missing)} not installed (pip install {' '.join(missing)})"


def llama_cpp_version() -> str:
    """llama-cpp-python's version, the ggml it bundles (version and commit, read from its library) and the CPU
    features that ggml build uses (llama.cpp's system info)."""
    import llama_cpp

    # The wheel keeps its ggml beside the bindings (libggml-base.so, .dylib or ggml-base.dll).
    libraries = sorted((Path(llama_cpp.__file__).parent / "lib").glob("*ggml-base*"))
    ggml_version = "ggml version unknown"
    if libraries:
        ggml = ctypes.CDLL(str(libraries[0]))
        ggml.ggml_version.restype = ggml.ggml_commit.restype = ctypes.c_char_p
        ggml_version = f"ggml {ggml.ggml_version().decode()}, commit {ggml.ggml_commit().decode()}"
    # System info reads "CPU : SSE3 = 1 | AVX2 = 1 | ... |": the features switched on.
    items = llama_cpp.llama_print_system_info().decode().split("|")
    features = [item.split("=")[0].split(":")[-1].strip() for item in items if item.strip().endswith("= 1")]
    return (f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')} ({ggml_version}; "
            f"CPU backend: {' '.join(features)})")


def load_llama_cpp(path: Path, context: int, threads: int):
    """llama.cpp's model and context for one sequence of `context` tokens, on `threads` threads for the prompt and
    for decoding; every other setting is llama-cpp-python's default."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_cpp_generation(llm, prompt: list[int], new_tokens: int) -> Callable[[], Timeline]:
    """`new_tokens` greedy tokens after `prompt` through `Llama.generate` (llama.cpp's greedy sampler at temperature
    0). `Llama.generate` never stops by itself (end-of-sequence is a stop of `create_completion`), so exactly
    `new_tokens` come out. `reset()` first: `generate` would otherwise reuse the previous call's cached prompt."""

    def call() -> Timeline:
        llm.reset()
        tokens, times = [], []
        start = time.perf_counter()
        for token in llm.generate(prompt, top_k=1, temp=0.0):
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
        return Timeline(tokens, start, times, time.perf_counter())

    return call
