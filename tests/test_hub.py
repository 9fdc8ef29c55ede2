"""Hub sharing end to end through the genuine huggingface_hub client, against the local emulator (tests/hub_emulator.py).

Every test name contains "hub", so `pytest -k hub` runs them all.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE into `constants` when it is imported (conftest sets
HF_HUB_OFFLINE=1 for the whole session), so in this process the `hub` fixture points those constants at the
emulator; the fresh process that pulls gets HF_ENDPOINT in its environment instead.
"""

import itertools
import re
import json
import math
import os
import shutil

import pytest
import torch
from conftest import run_without_package, tiny_config, tiny_moe_config
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from hub_emulator import HubEmulator
from transformers import AutoModelForCausalLM

from acx_ramanujan import RamanujanByteTokenizer, RamanujanForCausalLM, train_bpe_tokenizer
from acx_ramanujan.cli import main as acx_rt
from acx_ramanujan.hub import push_to_hub
from acx_ramanujan.cards import write_model_card
from acx_ramanujan.initialization_ramanujan import weight_std

TOKEN = "hf_emulator_write_token"
PROMPT = "To be, or not"


def point_client_at(emulator: HubEmulator, monkeypatch) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", emulator.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", emulator.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture(scope="module")
def emulator():
    hub = HubEmulator(tokens=(TOKEN,)).start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(emulator, monkeypatch):
    point_client_at(emulator, monkeypatch)
    return emulator


def save_run(directory, config, seed: int, max_shard_size: str | None = None):
    """What the training scripts leave in an output dir: model (remote code), tokenizer, card."""
    torch.manual_seed(seed)
    model = RamanujanForCausalLM(config)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    RamanujanByteTokenizer().save_pretrained(directory)
    write_model_card(directory, config, eval_results={"eval_loss": 5.4, "perplexity": math.exp(5.4)}, training={"steps": 0})
    return directory


def logits_and_text(model_dir) -> tuple[torch.Tensor, str]:
    """The reference: the saved directory loaded with the package installed."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = RamanujanByteTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return logits, tokenizer.decode(generated[0])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("run") / "tiny", tiny_config(), seed=0)


PULL_IN_FRESH_PROCESS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
repo_id, first_commit, prompt = json.loads(open("pull_args.json").read())
results = {}
for name, revision in (("main", None), ("first", first_commit)):
    model = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision, trust_remote_code=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    text = tokenizer.decode(model.generate(**inputs, max_new_tokens=12, do_sample=False)[0])
    results[name] = {"logits": logits.tolist(), "text": text, "model_module": type(model).__module__,
                     "tokenizer_module": type(tokenizer).__module__}
print(json.dumps(results))
"""


def test_hub_push_then_pull_in_fresh_process_with_revisions(hub, tmp_path):
    repo_id = "test-user/tiny-dense"
    first = push_to_hub(save_run(tmp_path / "v1", tiny_config(), seed=0), repo_id)
    # The second run is saved in shards: the index and every shard travel in the same single commit.
    second_dir = save_run(tmp_path / "v2", tiny_config(), seed=1, max_shard_size="20KB")
    assert len(list(second_dir.glob("model-*.safetensors"))) > 1
    second = push_to_hub(second_dir, repo_id, commit_message="second run")

    repo = hub.repos[repo_id]
    assert first.oid != second.oid and repo.branches["main"] == second.oid
    assert repo.commits[second.oid].parent == first.oid  # one commit per push, history kept
    files = repo.commits[second.oid].files
    assert "model.safetensors" not in files  # the first push's single file would shadow the new shards
    for name in ("config.json", "generation_config.json", "README.md", "tokenizer_config.json", "model.safetensors.index.json",
                 "configuration_ramanujan.py", "modeling_ramanujan.py", "initialization_ramanujan.py", "tokenization_ramanujan.py"):
        assert name in files, name
    assert "auto_map" in json.loads(files["config.json"])

    (tmp_path / "pull_args.json").write_text(json.dumps([repo_id, first.oid, PROMPT]))
    child = run_without_package(PULL_IN_FRESH_PROCESS, cwd=tmp_path, extra_env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": ""})
    pulled = json.loads(child.stdout.strip().splitlines()[-1])
    for name, run_dir in (("main", second_dir), ("first", tmp_path / "v1")):
        logits, text = logits_and_text(run_dir)
        torch.testing.assert_close(torch.tensor(pulled[name]["logits"]), logits)
        assert pulled[name]["text"] == text
        assert pulled[name]["model_module"].startswith("transformers_modules.")  # remote code, not the package
        assert pulled[name]["tokenizer_module"].startswith("transformers_modules.")


def test_hub_cli_push_to_private_branch(hub, base_run, capsys):
    repo_id = "test-user/tiny-branch"
    code = acx_rt(["push", str(base_run), repo_id, "--private", "--revision", "experiment", "--commit_message", "try a branch"])
    assert code == 0
    repo = hub.repos[repo_id]
    branch_head = repo.commits[repo.branches["experiment"]]
    assert branch_head.message == "try a branch" and "model.safetensors" in branch_head.files
    assert "model.safetensors" not in repo.commits[repo.branches["main"]].files  # main keeps only the initial commit
    assert branch_head.sha in capsys.readouterr().out
    assert HfApi(token=TOKEN).model_info(repo_id, revision="experiment").sha == branch_head.sha
    with pytest.raises(RepositoryNotFoundError):  # private: invisible without a token
        HfApi(token=False).model_info(repo_id)


def test_hub_push_private_into_an_existing_public_repo_is_refused(hub, base_run, capsys):
    """create_repo(exist_ok=True) keeps a public repo public: --private must not upload into it."""
    repo_id = "test-user/tiny-public"
    assert acx_rt(["push", str(base_run), repo_id]) == 0
    commits_before = len(hub.repos[repo_id].commits)
    assert acx_rt(["push", str(base_run), repo_id, "--private"]) == 1
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "already exists and is public" in message[0]
    assert len(hub.repos[repo_id].commits) == commits_before and not hub.repos[repo_id].private


def test_hub_push_without_token_fails_before_any_request(hub, base_run, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert not os.path.exists(constants.HF_TOKEN_PATH)  # conftest's private HF_HOME holds no stored token
    requests_before = len(hub.requests)
    assert acx_rt(["push", str(base_run), "test-user/no-token"]) == 1
    message = capsys.readouterr().err
    assert "no Hugging Face token" in message and "HF_TOKEN" in message and len(message.strip().splitlines()) == 1
    assert len(hub.requests) == requests_before


def test_hub_push_with_rejected_token_names_the_problem_and_hides_the_token(hub, base_run, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_value")
    assert acx_rt(["push", str(base_run), "test-user/bad-token"]) == 1
    message = capsys.readouterr().err
    assert "rejected the token (401)" in message and "hf_wrong_secret_value" not in message
    assert "test-user/bad-token" not in hub.repos


def test_hub_push_to_an_unreachable_hub_says_so(hub, base_run, capsys):
    hub.stop()  # keep its port: nothing listens there now
    try:
        assert acx_rt(["push", str(base_run), "test-user/unreachable"]) == 1
        message = capsys.readouterr().err
        assert message.startswith(f"acx-rt push: error: cannot reach the Hub at {hub.url}") and len(message.strip().splitlines()) == 1
    finally:
        hub.start()


def test_hub_emulator_refuses_writes_without_a_token(hub):
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=False).create_repo("test-user/anonymous")
    assert error.value.response.status_code == 401
    assert "test-user/anonymous" not in hub.repos


def exception_chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def test_hub_emulator_going_away_mid_pull_leaves_cache_usable(base_run, tmp_path, monkeypatch, caplog):
    hub = HubEmulator(tokens=(TOKEN,)).start()
    point_client_at(hub, monkeypatch)
    repo_id, cache = "test-user/flaky", tmp_path / "cache"
    try:
        first = push_to_hub(base_run, repo_id)
        first_model = AutoModelForCausalLM.from_pretrained(repo_id, cache_dir=cache, trust_remote_code=True)
        second_dir = save_run(tmp_path / "v2", tiny_config(), seed=1)
        second = push_to_hub(second_dir, repo_id)
        weights_size = (second_dir / "model.safetensors").stat().st_size
        hub.fail_next_download("model.safetensors", after_bytes=weights_size // 2, go_away=True)

        # The client retries until it gives up on the unreachable emulator, then says so. Transformers
        # wraps it in "Can't load the model ..."; the connection error is the chained cause, and is logged.
        with pytest.raises(OSError) as error:
            AutoModelForCausalLM.from_pretrained(repo_id, cache_dir=cache, trust_remote_code=True)
        assert any("Connection refused" in str(cause) for cause in exception_chain(error.value))
        assert "Max retries exceeded" in caplog.text
        # Nothing half-written is left in the cache: no partial blob, no weights in the new snapshot.
        assert not list(cache.rglob("*.incomplete"))
        assert not list(cache.glob(f"*/snapshots/{second.oid}/model.safetensors"))

        # The cache still serves the first revision, offline, with its exact weights.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        cached = AutoModelForCausalLM.from_pretrained(repo_id, revision=first.oid, cache_dir=cache, trust_remote_code=True)
        for (name, expected), actual in zip(first_model.state_dict().items(), cached.state_dict().values()):
            torch.testing.assert_close(actual, expected, msg=name)

        # Back online, the same cache completes the second revision.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        hub.start()
        pulled = AutoModelForCausalLM.from_pretrained(repo_id, cache_dir=cache, trust_remote_code=True)
        reference = AutoModelForCausalLM.from_pretrained(second_dir)
        for (name, expected), actual in zip(reference.state_dict().items(), pulled.state_dict().values()):
            torch.testing.assert_close(actual, expected, msg=name)
    finally:
        hub.stop()


def test_hub_dropped_connection_mid_download_is_retried_transparently(hub, base_run, tmp_path):
    repo_id = "test-user/blip"
    push_to_hub(base_run, repo_id)
    weights = (base_run / "model.safetensors").read_bytes()
    hub.fail_next_download("model.safetensors", after_bytes=len(weights) // 3, go_away=False)
    path = hf_hub_download(repo_id, "model.safetensors", cache_dir=tmp_path)
    assert open(path, "rb").read() == weights
    url_path = f"/{repo_id}/resolve/main/model.safetensors"
    assert hub.requests[-2:] == [("GET", url_path)] * 2  # dropped, then retried


@pytest.fixture
def broken_run(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    return run


def link_outside(run, name):
    """Replace `run/name` by a symbolic link to the same file moved out of the directory."""
    outside = run.parent / f"outside-{name}"
    shutil.move(run / name, outside)
    (run / name).symlink_to(outside)


def save_weights_of(config, directory):
    RamanujanForCausalLM(config).save_pretrained(directory / "other")
    shutil.move(directory / "other" / "model.safetensors", directory / "model.safetensors")


def use_bpe_tokenizer(run, vocab_size: int):
    """Replace the byte tokenizer by a byte-level BPE one (tokenizer.json, no code files)."""
    for name in ("tokenizer_config.json", "tokenization_ramanujan.py", "added_tokens.json", "special_tokens_map.json"):
        (run / name).unlink(missing_ok=True)
    train_bpe_tokenizer(iter(["to be or not to be, that is the question"] * 200), vocab_size, output_dir=run)


def drop_shard(run):
    RamanujanForCausalLM.from_pretrained(run).save_pretrained(run, max_shard_size="20KB")
    (run / "model.safetensors").unlink()
    sorted(run.glob("model-*.safetensors"))[-1].unlink()


BAD_INPUTS = {
    "invalid repo id": (lambda run: None, "not a/valid/repo id", "invalid repo id"),
    "missing dir": (lambda run: shutil.rmtree(run), "test-user/x", "does not exist"),
    "no config": (lambda run: (run / "config.json").unlink(), "test-user/x", "has no config.json"),
    "malformed config": (lambda run: (run / "config.json").write_text("{not json"), "test-user/x",
                         "config.json is not a readable JSON file: Expecting property name"),
    "config not an object": (lambda run: (run / "config.json").write_text("[1, 2]"), "test-user/x",
                             "config.json does not hold a JSON object"),
    "malformed tokenizer config": (lambda run: (run / "tokenizer_config.json").write_text('{"a": '), "test-user/x",
                                   "tokenizer_config.json is not a readable JSON file"),
    "no weights": (lambda run: (run / "model.safetensors").unlink(), "test-user/x", "has no weights"),
    "weights of another config": (lambda run: save_weights_of(tiny_config(hidden_size=48), run), "test-user/x",
                                  "do not match its config.json: shape (saved vs config) lm_head.weight (259, 48) vs (259, 32); model.embed_tokens.weight (259, 48) vs (259, 32)"),
    "weights of a MoE config": (lambda run: save_weights_of(tiny_moe_config(), run), "test-user/x", "unexpected model.layers.0.mlp.e_score_correction_bias, model.layers.0.mlp.experts"),
    "missing shard": (drop_shard, "test-user/x", "index.json names shard(s) that are missing: model-0000"),
    "missing code file": (lambda run: (run / "initialization_ramanujan.py").unlink(), "test-user/x", "lacks the code file initialization_ramanujan.py"),
    "no tokenizer": (lambda run: (run / "tokenizer_config.json").unlink(), "test-user/x", "has no tokenizer_config.json"),
    "invalid card": (lambda run: (run / "README.md").write_text("---\n- not: a mapping\n---\ntext\n"), "test-user/x",
                     "README.md is not a valid model card"),
    "weights linked from outside": (lambda run: link_outside(run, "model.safetensors"), "test-user/x",
                                    "model.safetensors is a link to "),
    "include outside the dir": (lambda run: None, ["test-user/x", "--include", "../secret.txt"], "--include ../secret.txt: give a path"),
    "include a missing file": (lambda run: None, ["test-user/x", "--include", "notes.txt"], "notes.txt is not a file in"),
    "tokenizer larger than the vocabulary": (lambda run: use_bpe_tokenizer(run, 280), "test-user/x",
                                             "has 280 tokens, more than the model's vocab_size 259"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_hub_push_bad_input_fails_before_any_request(hub, broken_run, case, capsys):
    break_run, repo_id, expected = BAD_INPUTS[case]
    break_run(broken_run)
    capsys.readouterr()  # drop the progress bars of breaking the run
    requests_before = len(hub.requests)
    assert acx_rt(["push", str(broken_run), *([repo_id] if isinstance(repo_id, str) else repo_id)]) == 2
    message = capsys.readouterr().err
    assert expected in message, message
    assert message.startswith("acx-rt push: ") and len(message.strip().splitlines()) == 1
    assert len(hub.requests) == requests_before


def test_hub_push_accepts_a_bpe_tokenizer_without_code_files(hub, broken_run):
    use_bpe_tokenizer(broken_run, 259)
    commit = push_to_hub(broken_run, "test-user/tiny-bpe")
    files = hub.repos["test-user/tiny-bpe"].commits[commit.oid].files
    assert "tokenizer.json" in files and "tokenization_ramanujan.py" not in files


def ramanujan_scales_closed_form(num_layers: int) -> list[float]:
    """For L ≤ 12 layers the seed's R = min(8, max(4, L//3)) = 4, clamped to L; recurrence written out by hand."""
    a = [1.0, math.pi / math.sqrt(3.0)]
    for k in range(1, 8):
        a.append((math.pi**2 / k**2) * a[k] + 2.0 * math.pi / (k * (k + 1)) * a[k - 1])
    depth = min(4, num_layers)
    peak = max(abs(x) for x in a[: depth + 1])
    return [max(0.1, math.sqrt(abs(a[layer]) / peak)) for layer in range(num_layers)]


def card_table(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header starts with `header_start`."""
    lines = text[text.index(header_start):].splitlines()[2:]
    rows = itertools.takewhile(lambda line: line.startswith("|"), lines)
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_hub_card_metadata_parses_and_states_measured_results(tmp_path):
    config = tiny_config(num_hidden_layers=3, init_scheme="ramanujan")
    eval_results = {"eval_loss": 1.91, "perplexity": math.exp(1.91), "bits_per_byte": 2.76, "eval_runtime": 3.5}
    training = {"steps": 200, "tokens": 153600, "wall_time_s": 41.5, "hardware": "2-core CPU",
                "hyperparameters": {"learning_rate": 1e-3, "block_size": 64}}
    path = write_model_card(tmp_path, config, eval_results=eval_results, training=training, dataset_name="tiny_shakespeare",
                            base_model="test-user/tiny-base")
    card = ModelCard.load(path)
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "text-generation", "apache-2.0")
    assert "ramanujan-init" in data.tags and "moe" not in data.tags
    assert data.datasets == ["tiny_shakespeare"] and data.base_model == "test-user/tiny-base"
    measured = {result.metric_type: result.metric_value for result in data.eval_results}
    assert measured == {"loss": 1.91, "perplexity": math.exp(1.91), "bits_per_byte": 2.76}  # runtime is not a quality metric
    assert all(result.dataset_split == "validation" for result in data.eval_results)
    for fact in ("| Optimizer steps | 200 |", "| Training tokens | 153,600 |", "41.5 s", "2-core CPU", "`learning_rate` | `0.001`",
                 "trust_remote_code=True", "docs/init-study.md", f"| Parameters | {RamanujanForCausalLM(config).num_parameters():,} |"):
        assert fact in card.text, fact
    for unmeasured in ("variance preservation", "infinite depth", "faster convergence"):
        assert unmeasured not in card.text.lower()

    rows = card_table(card.text, "| Layer | Block |")
    scales = ramanujan_scales_closed_form(3)
    assert [float(row[2]) for row in rows] == pytest.approx(scales, abs=1e-4)
    # q/k and v std = gain · scale(l) / √fan_in (the seed's formula), fan_in = hidden_size
    assert [float(row[4]) for row in rows] == [float(row[3]) for row in rows]
    assert [float(row[3]) for row in rows] == pytest.approx([s / math.sqrt(config.hidden_size) for s in scales], rel=1e-3)


@pytest.mark.parametrize("overrides, schemes", [
    (dict(init_scheme="deepnorm", deepnorm=True), ["DeepNorm post-norm layers: x ← norm(1.565·x + f(x))"]),
    (dict(init_scheme="depth_scaled"), []),
    (dict(depth_parametrization="completep", depth_base_layers=1, layernorm_scaling=True),
     ["completep: every attention and MLP branch × 0.3333 (L0 = 1)",
      "LayerNorm Scaling: the pre-norms of layer l (from 1) × 1/√l"]),
])
def test_hub_card_states_the_depth_schemes_and_each_projections_std(tmp_path, overrides, schemes):
    config = tiny_config(num_hidden_layers=3, **overrides)
    card = ModelCard.load(write_model_card(tmp_path, config, eval_results={}, training={}))
    depth_rows = [line for line in card.text.splitlines() if line.startswith("| Depth scheme |")]
    assert depth_rows == [f"| Depth scheme | {scheme} |" for scheme in schemes]
    # columns: q/k, v, o_proj, gate, up; (fan_in, fan_out) at width 32 with 4 heads of 8, 2 kv heads, SwiGLU 64
    columns = {3: ("linear", 32, 32), 4: ("value_projection", 32, 16), 5: ("output_projection", 32, 32),
               6: ("gate_projection", 32, 64), 7: ("up_projection", 32, 64)}
    for row in card_table(card.text, "| Layer | Block |"):
        for column, (role, fan_in, fan_out) in columns.items():
            std = weight_std(config, role, fan_in, fan_out, int(row[0]))
            assert float(row[column]) == pytest.approx(std, rel=1e-3), (row[0], role)


def test_hub_card_for_moe_and_for_a_run_that_recorded_nothing(tmp_path):
    config = tiny_moe_config(first_k_dense_layers=1, init_scheme="xavier")
    card = ModelCard.load(write_model_card(tmp_path, config, eval_results={}, training={}, dataset_name="notes.txt, more notes.txt"))
    assert card.data.datasets is None and "Trained on `notes.txt, more notes.txt`" in card.text  # not a Hub dataset id
    assert "moe" in card.data.tags and "xavier-init" in card.data.tags and "ramanujan-init" not in card.data.tags
    assert card.data.eval_results is None and "model_name" not in card.data.to_dict()
    assert "No evaluation results were recorded" in card.text and "recorded no compute figures" in card.text
    assert "top 2 of 4 experts" in card.text
    rows = card_table(card.text, "| Layer | Block |")
    assert [row[1] for row in rows] == ["dense", "MoE"]
    assert rows[0][9] == "—" and float(rows[1][9]) == pytest.approx(config.initializer_range)  # router std, MoE layer only
    # xavier: √(2 / (fan_in + fan_out)) for the expert up-projection (hidden → moe_intermediate_size)
    assert float(rows[1][7]) == pytest.approx(math.sqrt(2 / (config.hidden_size + config.moe_intermediate_size)), rel=1e-3)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_hub_card_says_whether_the_model_normalizes_q_and_k(tmp_path, qk_norm):
    card = ModelCard.load(write_model_card(tmp_path, tiny_config(qk_norm=qk_norm), eval_results={}, training={}))
    assert ("| QK-norm | RMSNorm over the head dimension" in card.text) == qk_norm
    assert "| Tied embeddings |" in card.text  # the table around it unbroken


MODEL_REPO_FILES = {"config.json", "generation_config.json", "model.safetensors", "configuration_ramanujan.py",
                    "modeling_ramanujan.py", "initialization_ramanujan.py", "tokenization_ramanujan.py",
                    "tokenizer_config.json", "added_tokens.json", "chat_template.jinja", "README.md"}


def litter(run):
    """What else lies in a real output dir, or ends up there: none of it belongs in a model repository."""
    (run / ".env.json").write_text('{"HF_TOKEN": "hf_from_a_dotenv"}')
    (run / "notes.txt").write_text("private notes")
    (run / "metrics.json").write_text("{}")
    (run / ".model.partial.safetensors").write_bytes(b"half a file")
    (run / "training_args.bin").write_bytes(b"a pickle")
    (run / "checkpoint-1").mkdir()
    (run / "checkpoint-1" / "config.json").write_text("{}")
    outside = run.parent / "elsewhere.json"
    outside.write_text('{"secret": "outside the run"}')
    (run / "linked.json").symlink_to(outside)
    (run / "eval_results.json").write_text(json.dumps({"eval_loss": 5.4}))


def test_hub_push_uploads_only_model_files_and_named_includes(hub, broken_run, capsys):
    litter(broken_run)
    assert acx_rt(["push", str(broken_run), "test-user/tidy", "--include", "notes.txt"]) == 0
    repo = hub.repos["test-user/tidy"]
    files = set(repo.commits[repo.branches["main"]].files)
    assert files == MODEL_REPO_FILES | {"eval_results.json", "notes.txt", ".gitattributes"}
    listed = capsys.readouterr().out
    for name in MODEL_REPO_FILES | {"eval_results.json", "notes.txt"}:
        assert f"  {name} (" in listed, name


def test_hub_push_never_follows_a_link_out_of_the_directory(hub, broken_run, capsys):
    (broken_run.parent / "secret.txt").write_text("outside")
    (broken_run / "secret.txt").symlink_to(broken_run.parent / "secret.txt")
    requests_before = len(hub.requests)
    assert acx_rt(["push", str(broken_run), "test-user/linked", "--include", "secret.txt"]) == 2
    message = capsys.readouterr().err
    assert "secret.txt is a link to " in message and len(message.strip().splitlines()) == 1
    assert len(hub.requests) == requests_before


def test_hub_push_dry_run_lists_the_files_and_sends_nothing(hub, broken_run, monkeypatch, capsys):
    litter(broken_run)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any request would now fail
    monkeypatch.delenv("HF_TOKEN")
    requests_before = len(hub.requests)
    assert acx_rt(["push", str(broken_run), "test-user/dry", "--dry_run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"would upload {len(MODEL_REPO_FILES) + 1} files for test-user/dry:"
    assert {line.split(" (")[0].strip() for line in out[1:]} == MODEL_REPO_FILES | {"eval_results.json"}
    assert len(hub.requests) == requests_before and "test-user/dry" not in hub.repos


def test_hub_push_in_offline_mode_is_one_line(hub, base_run, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests_before = len(hub.requests)
    assert acx_rt(["push", str(base_run), "test-user/offline"]) == 1
    message = capsys.readouterr().err
    assert message.startswith("acx-rt push: error: HF_HUB_OFFLINE is set") and len(message.strip().splitlines()) == 1
    assert len(hub.requests) == requests_before


def test_hub_failed_commit_deletes_the_repo_this_push_created(hub, base_run, capsys):
    hub.fail_next_commit()
    assert acx_rt(["push", str(base_run), "test-user/failed-first"]) == 1
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "the emulator refuses this commit" in message[0], message
    assert "deleted the repository test-user/failed-first this push had created" in message[0]
    assert "test-user/failed-first" not in hub.repos


def test_hub_failed_commit_keeps_a_repo_that_existed(hub, base_run, tmp_path, capsys):
    assert acx_rt(["push", str(base_run), "test-user/failed-later"]) == 0
    repo = hub.repos["test-user/failed-later"]
    head = repo.branches["main"]
    second_run = save_run(tmp_path / "v2", tiny_config(), seed=1)  # other weights: the client has something to commit
    capsys.readouterr()  # drop the progress bars of saving it
    hub.fail_next_commit()
    assert acx_rt(["push", str(second_run), "test-user/failed-later"]) == 1
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "the emulator refuses this commit" in message[0] and "delete" not in message[0]
    assert hub.commit_failure is None  # the commit was attempted
    assert hub.repos["test-user/failed-later"] is repo and repo.branches["main"] == head


def test_hub_push_writes_a_card_for_a_folder_without_one(hub, broken_run, capsys):
    (broken_run / "README.md").unlink()
    (broken_run / "eval_results.json").write_text(json.dumps({"eval_loss": 1.5, "perplexity": math.exp(1.5), "epoch": 1.0}))
    before = {path.name: path.read_bytes() for path in broken_run.iterdir()}
    assert acx_rt(["push", str(broken_run), "test-user/carded"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if "has no README.md" in line]) == 1
    repo = hub.repos["test-user/carded"]
    card = ModelCard(repo.commits[repo.branches["main"]].files["README.md"].decode())
    assert {result.metric_type: result.metric_value for result in card.data.eval_results} == {"loss": 1.5, "perplexity": math.exp(1.5)}
    assert 'model_id = "test-user/carded"' in card.text
    assert {path.name: path.read_bytes() for path in broken_run.iterdir()} == before  # the directory is left as it was


def test_hub_push_card_without_results_says_so_and_a_written_card_is_kept(hub, broken_run):
    written = (broken_run / "README.md").read_bytes()
    push_to_hub(broken_run, "test-user/own-card")
    repo = hub.repos["test-user/own-card"]
    assert repo.commits[repo.branches["main"]].files["README.md"] == written
    (broken_run / "README.md").unlink()
    push_to_hub(broken_run, "test-user/own-card")
    card = ModelCard(repo.commits[repo.branches["main"]].files["README.md"].decode())
    assert card.data.eval_results is None and "No evaluation results were recorded" in card.text


@pytest.mark.parametrize("config", [tiny_config(), tiny_moe_config(), tiny_config(architectures=["RamanujanForSequenceClassification"])],
                         ids=["dense", "moe", "classifier"])
def test_hub_cards_link_only_to_pages_that_exist(tmp_path, config):
    """The package is not on PyPI: no card links there or tells anyone to `pip install` it by name."""
    text = write_model_card(tmp_path, config, eval_results={}, training={}, base_model="test-user/tiny-base").read_text()
    assert re.findall(r"https?://[^\s)\"'>`]+", text) == ["https://huggingface.co/test-user/tiny-base"]
    assert "pip install acx-ramanujan-transformer" not in text


FINETUNE = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--block_size", "16",
            "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--push_to_hub"]


@pytest.mark.parametrize("given_as", ["flag", "environment"])
def test_hub_finetune_push_never_writes_or_uploads_the_token(hub, base_run, tmp_path, monkeypatch, capsys, caplog, given_as):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox"}) + "\n" for i in range(40)))
    output = tmp_path / "out"
    token_flag = ["--hub_token", TOKEN] if given_as == "flag" else []
    if given_as == "flag":
        monkeypatch.delenv("HF_TOKEN")
    status = acx_rt(["finetune", "--model_name_or_path", str(base_run), "--train_file", str(data), "--output_dir",
                     str(output), *token_flag, *FINETUNE, "--hub_model_id", f"test-user/finetuned-{given_as}"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    written = [path for path in output.rglob("*") if path.is_file()]
    assert any(path.name == "training_args.bin" for path in written) and (output / "checkpoint-2").is_dir()
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in captured.out + captured.err + caplog.text
    repo = hub.repos[f"test-user/finetuned-{given_as}"]
    assert len(repo.commits) == 2  # the repo's initial commit and one push of the finished run
    files = repo.commits[repo.branches["main"]].files
    assert set(files) == MODEL_REPO_FILES | {"eval_results.json", "all_results.json", ".gitattributes"}
    assert all(TOKEN.encode() not in content for content in files.values())
    assert all(TOKEN.encode() not in body for body in hub.bodies)
    assert "ramanujan-init" in files["README.md"].decode() or "ramanujan" in ModelCard(files["README.md"].decode()).data.tags


def test_hub_finetune_with_lora_pushes_the_merged_model(hub, base_run, tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox"}) + "\n" for i in range(40)))
    output = tmp_path / "out"
    status = acx_rt(["finetune", "--model_name_or_path", str(base_run), "--train_file", str(data), "--output_dir", str(output),
                     "--use_lora", "--lora_r", "4", "--merge_lora", *FINETUNE, "--hub_model_id", "test-user/merged"])
    assert status == 0, capsys.readouterr().err
    repo = hub.repos["test-user/merged"]
    files = repo.commits[repo.branches["main"]].files
    assert set(files) == MODEL_REPO_FILES | {".gitattributes"}  # no adapter files, no results files (they stay beside the adapter)
    assert files["model.safetensors"] == (output / "merged" / "model.safetensors").read_bytes()
