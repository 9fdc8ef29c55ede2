"""`acx-rt push`: validate an output directory, then share it on the Hugging Face Hub in one commit.

Pulling needs nothing from us: `AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)` read what `save_pretrained` wrote (config.json with
`auto_map`, the code files, safetensors weights, tokenizer files). Everything is checked locally first, so a bad
directory fails with a clear message before any request; the upload itself is `huggingface_hub.HfApi.upload_folder`.
The token comes from `huggingface_hub.get_token` (HF_TOKEN, or the file `hf auth login` writes) and is never printed.
"""

import argparse
import sys
from pathlib import Path

import httpx2
from accelerate import init_empty_weights
from huggingface_hub import CommitInfo, HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoTokenizer
from transformers.dynamic_module_utils import get_relative_import_files

from . import modeling_ramanujan
from .modeling_ramanujan import RamanujanForCausalLM
from .saved_files import first_line, read_json_object, safetensors_shapes

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

# What a model repository holds: top-level config/tokenizer JSON, weights, code, card, chat template, vocabularies.
# Checkpoints, logs and optimizer state stay local (`*/*` skips every subfolder).
UPLOAD_PATTERNS = ["*.json", "*.safetensors", "*.py", "README.md", "*.jinja", "*.txt"]
IGNORE_PATTERNS = ["*/*"]
# Weights of an earlier push that this one does not overwrite are deleted in the same commit: Transformers
# prefers model.safetensors over an index, so a stale single file would shadow newly sharded weights.
STALE_WEIGHT_PATTERNS = ["*.safetensors", WEIGHTS_INDEX]


def push_to_hub(
    output_dir,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Push `output_dir` to `repo_id` (created if missing; `revision`: a branch, created if missing) in one commit.

    Raises ValueError naming the problem for a bad repo id, a directory without config, weights, tokenizer
    or code files, weights whose names or shapes differ from what the config builds, and a missing token —
    all before anything is sent — and for `private` with an existing public repo, before anything is uploaded.
    """
    output_dir = Path(output_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid repo id {repo_id!r}: {error}") from None
    check_output_dir(output_dir)
    token = token or get_token()
    if token is None:
        raise ValueError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")

    api = HfApi(token=token)
    try:
        api.whoami()
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise ValueError(f"the Hub at {api.endpoint} rejected the token (401): check HF_TOKEN or `hf auth login`") from None
        raise
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if private and not api.repo_info(repo_id).private:
        # create_repo leaves an existing repo's visibility alone: refuse rather than upload into a public repo.
        raise ValueError(f"{repo_id} already exists and is public, so --private would not apply; make it private on "
                         "the Hub (or with HfApi.update_repo_settings) first, or push without --private")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        revision=revision,
        commit_message=commit_message or f"Upload {output_dir.resolve().name} with acx-rt push",
        allow_patterns=UPLOAD_PATTERNS,
        ignore_patterns=IGNORE_PATTERNS,
        delete_patterns=STALE_WEIGHT_PATTERNS,
    )


def check_output_dir(output_dir: Path) -> None:
    """Everything a `from_pretrained(repo_id, trust_remote_code=True)` will need is here and consistent."""
    if not output_dir.is_dir():
        raise ValueError(f"output dir {output_dir} does not exist")
    if not (output_dir / "config.json").is_file():
        raise ValueError(f"{output_dir} has no config.json: save the model with model.save_pretrained({str(output_dir)!r})")
    auto_map = read_json_object(output_dir / "config.json").get("auto_map")
    try:
        config = AutoConfig.from_pretrained(output_dir)
    except OSError as error:
        raise ValueError(f"{output_dir}/config.json could not be loaded: {first_line(error)}") from None
    if not auto_map:
        raise ValueError(
            f"{output_dir}/config.json has no auto_map, so the model cannot load with trust_remote_code=True: "
            "import acx_ramanujan before save_pretrained"
        )
    check_code_files(output_dir, "config.json")
    check_weights(output_dir, config)
    if not (output_dir / "tokenizer_config.json").is_file():
        raise ValueError(f"{output_dir} has no tokenizer_config.json: save the tokenizer with tokenizer.save_pretrained(...)")
    check_code_files(output_dir, "tokenizer_config.json")  # a BPE tokenizer (tokenizer.json) needs no code
    try:
        tokenizer_size = len(AutoTokenizer.from_pretrained(output_dir))
    except OSError as error:
        raise ValueError(f"the tokenizer in {output_dir} could not be loaded: {first_line(error)}") from None
    if tokenizer_size > config.vocab_size:
        raise ValueError(f"the tokenizer in {output_dir} has {tokenizer_size} tokens, more than the model's vocab_size {config.vocab_size}")
    if not (output_dir / "README.md").is_file():
        raise ValueError(f"{output_dir} has no model card (README.md): write one with hub_cards.write_model_card")
    try:
        ModelCard.load(output_dir / "README.md")
    except ValueError as error:
        raise ValueError(f"{output_dir}/README.md is not a valid model card: {error}") from None


def check_code_files(output_dir: Path, json_name: str) -> None:
    """The code files the JSON file's `auto_map` names, and the files they import relatively, sit beside it."""
    auto_map = read_json_object(output_dir / json_name).get("auto_map") or {}
    references = [value for values in auto_map.values() for value in (values if isinstance(values, list) else [values])]
    modules = {reference.rsplit(".", 1)[0] for reference in references if reference and "--" not in reference}
    for module in sorted(modules):
        module_file = output_dir / f"{module}.py"
        try:
            files = [module_file, *map(Path, get_relative_import_files(module_file))]
        except FileNotFoundError as error:
            raise ValueError(f"{output_dir} lacks the code file {Path(error.filename).name} that {json_name} needs") from None
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise ValueError(f"{output_dir} lacks the code file(s) {', '.join(missing)} that {json_name} needs")


def check_weights(output_dir: Path, config) -> None:
    """Tensor names and shapes in the safetensors files equal those of the model the config builds.

    The model is built on the meta device (no memory); weights tied to another (`all_tied_weights_keys`) may be
    absent from the files, since `save_pretrained` stores them once.
    """
    saved = saved_shapes(output_dir)
    architecture = (config.architectures or [RamanujanForCausalLM.__name__])[0]
    model_class = getattr(modeling_ramanujan, architecture, None)
    if model_class is None:
        raise ValueError(f"{output_dir}/config.json names architecture {architecture!r}, which acx_ramanujan does not define")
    with init_empty_weights():
        model = model_class(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = sorted(set(expected) - set(saved) - set(model.all_tied_weights_keys))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [f"{name} {saved[name]} vs {expected[name]}" for name in sorted(set(saved) & set(expected)) if saved[name] != expected[name]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}" + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    if mismatched:
        problems.append(f"shape (saved vs config) {'; '.join(mismatched[:5])}")
    if problems:
        raise ValueError(f"the weights in {output_dir} do not match its config.json: {' | '.join(problems)}")


def saved_shapes(output_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape over `model.safetensors` or every shard its index names (headers only, no tensor data)."""
    if (output_dir / WEIGHTS_INDEX).is_file():
        weight_map = read_json_object(output_dir / WEIGHTS_INDEX).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not (output_dir / name).is_file()]
        if absent:
            raise ValueError(f"{output_dir}/{WEIGHTS_INDEX} names shard(s) that are missing: {', '.join(absent)}")
    elif (output_dir / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise ValueError(f"{output_dir} has no weights ({WEIGHTS} or {WEIGHTS_INDEX}): save with model.save_pretrained")
    return safetensors_shapes(output_dir / name for name in files)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acx-rt push", description="Push a saved model directory to the Hugging Face Hub in one commit.")
    parser.add_argument("output_dir", help="directory written by `acx-rt train` / `acx-rt finetune` (or save_pretrained)")
    parser.add_argument("repo_id", help="namespace/name on the Hub")
    parser.add_argument("--private", action="store_true",
                        help="create the repository as private; refused for an existing public repository")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--commit_message", help="commit message (default: 'Upload <dir> with acx-rt push')")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        commit = push_to_hub(args.output_dir, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message)
    except httpx2.TransportError as error:
        print(f"acx-rt push: cannot reach the Hub at {constants.ENDPOINT}: {error}", file=sys.stderr)
        return 1
    except (ValueError, HfHubHTTPError) as error:
        # Hub errors span several lines (status, url, hints); the first names the problem.
        print(f"acx-rt push: {first_line(error)}", file=sys.stderr)
        return 1
    print(f"pushed {args.output_dir} to {commit.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
