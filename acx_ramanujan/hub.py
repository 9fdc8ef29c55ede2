"""`acx-rt push`: validate an output directory, then share it on the Hugging Face Hub in one commit.

Pulling needs nothing from us: `AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)` read what `save_pretrained` wrote (config.json with
`auto_map`, the code files, safetensors weights, tokenizer files). Everything is checked locally first, so a bad
directory fails with a clear message before any request.

What is uploaded is an explicit list (`plan_upload`), not the folder: the files a model repository holds, each a
regular file inside the directory (a link out of it is refused), plus the files the user names with `--include`.
Checkpoints, optimizer state, Trainer's pickled `training_args.bin`, logs, hidden files and leftovers stay local.
The token comes from the caller or `huggingface_hub.get_token` (HF_TOKEN, or the file `hf auth login` writes), goes
only into the request headers, and is never printed.
"""

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx2
from accelerate import init_empty_weights
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from transformers import AutoConfig, AutoTokenizer
from transformers.dynamic_module_utils import get_relative_import_files

from . import modeling_ramanujan
from .cards import render_model_card
from .modeling_ramanujan import RamanujanForCausalLM
from .commands import WorkFailed, run_command
from .files import WEIGHTS, WEIGHTS_INDEX, check_saved_weights, first_line, read_json_object, weight_files

# What the Hub's client raises: HTTP errors (HfHubHTTPError, an OSError) and a connection that fails (the HTTP client's
# TransportError, which is not an OSError). A failed push also raises ValueError for bad input.
HUB_ERRORS = (HfHubHTTPError, httpx2.TransportError)
PUSH_ERRORS = (ValueError, OSError, *HUB_ERRORS)
CARD = "README.md"
MODEL_FILES = ["config.json", "generation_config.json"]
# What `tokenizer.save_pretrained` writes besides the tokenizer class's own `vocab_files_names` (vocab.json, merges.txt …).
TOKENIZER_FILES = ["tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json"]
EXTRA_CHAT_TEMPLATES = "additional_chat_templates"
# The measured results our training scripts and Trainer write; the card is built from the first one present.
RESULT_FILES = ["eval_results.json", "all_results.json"]
# Weights of an earlier push that this one does not overwrite are deleted in the same commit: Transformers
# prefers model.safetensors over an index, so a stale single file would shadow newly sharded weights.
STALE_WEIGHT_PATTERNS = ["*.safetensors", WEIGHTS_INDEX]


@dataclass
class Upload:
    """The files of one push: paths relative to `directory`, and the card generated for a directory without one."""

    directory: Path
    files: list[str]
    generated_card: str | None = None

    @property
    def paths_in_repo(self) -> list[str]:
        return sorted(self.files + ([CARD] if self.generated_card is not None else []))

    def operations(self) -> list[CommitOperationAdd]:
        additions = [CommitOperationAdd(name, str(self.directory / name)) for name in self.files]
        if self.generated_card is not None:
            additions.append(CommitOperationAdd(CARD, self.generated_card.encode("utf-8")))
        return additions

    def card_note(self) -> str:
        return (f"{self.directory} has no {CARD}: the upload gets a model card generated from its config.json and results "
                f"(the directory is left unchanged; write your own {CARD} there to replace it)")

    def announce(self, repo_id: str, verb: str) -> None:
        """Print the file list (`verb`: "uploading" or "would upload") and, if generated, the card's note."""
        print(f"{verb} {self.describe(repo_id)}")
        if self.generated_card is not None:
            print(self.card_note())

    def describe(self, repo_id: str) -> str:
        lines = [f"{len(self.paths_in_repo)} files for {repo_id}:"]
        for name in self.paths_in_repo:
            generated = name == CARD and self.generated_card is not None
            size = len(self.generated_card.encode("utf-8")) if generated else (self.directory / name).stat().st_size
            lines.append(f"  {name} ({size:,} bytes{', generated' if generated else ''})")
        return "\n".join(lines)


def push_to_hub(
    output_dir,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    include: Sequence[str] = (),
) -> CommitInfo:
    """Push the model in `output_dir` to `repo_id` (created if missing; `revision`: a branch, created if missing)
    in one commit, and print what it uploads.

    Raises ValueError naming the problem for a bad repo id, a bad directory (see `plan_upload`), offline mode and
    a missing token — all before anything is sent — for `private` with an existing public repo before anything
    is uploaded, and for a failed commit, after deleting the repository when this push created it.
    """
    upload = plan_upload(output_dir, repo_id, include)
    if constants.HF_HUB_OFFLINE:
        raise ValueError("HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it to push "
                         "(`acx-rt push --dry_run` lists what would be uploaded without the Hub)")
    token = token or get_token()
    if token is None:
        raise ValueError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")

    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise ValueError(f"the Hub at {api.endpoint} rejected the token (401): check HF_TOKEN or `hf auth login`") from None
        raise
    repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    created = create_or_find_repo(api, repo_id, private)
    if private and not created and not api.repo_info(repo_id).private:
        # An existing repo keeps its visibility: refuse rather than upload into a public repo.
        raise ValueError(f"{repo_id} already exists and is public, so --private would not apply; make it private on "
                         "the Hub (or with HfApi.update_repo_settings) first, or push without --private")
    upload.announce(repo_id, "uploading")
    try:
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote_files = api.list_repo_files(repo_id, revision=revision)
        stale = set(filter_repo_objects(remote_files, allow_patterns=STALE_WEIGHT_PATTERNS)) - set(upload.paths_in_repo)
        return api.create_commit(
            repo_id,
            operations=[*upload.operations(), *(CommitOperationDelete(name) for name in sorted(stale))],
            commit_message=commit_message or f"Upload {upload.directory.resolve().name} with acx-rt push",
            revision=revision,
        )
    except HUB_ERRORS as error:
        if not created:
            raise
        raise ValueError(f"the upload to {repo_id} failed ({hub_error_line(error)}); {delete_created_repo(api, repo_id)}") from None


def create_or_find_repo(api: HfApi, repo_id: str, private: bool) -> bool:
    """Create `repo_id`; False when it already exists. A token that may not create repositories (401/402/403)
    may still write to an existing one, as `create_repo(exist_ok=True)` also assumes."""
    try:
        api.create_repo(repo_id, private=private)
        return True
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 409 or (status in (401, 402, 403) and api.repo_exists(repo_id)):
            return False
        raise


def delete_created_repo(api: HfApi, repo_id: str) -> str:
    """Delete the (empty) repository a failed push created; the sentence saying what happened."""
    try:
        api.delete_repo(repo_id)
    except HUB_ERRORS as error:
        return f"the repository it created could not be deleted ({hub_error_line(error)}): delete {repo_id} on the Hub"
    return f"deleted the repository {repo_id} this push had created"


def hub_error_line(error: Exception) -> str:
    """One line for a Hub error: its first line and the server's own message, which the client puts further down."""
    line = first_line(error)
    server_message = getattr(error, "server_message", None)
    if server_message and first_line(server_message) not in line:
        return f"{line} {first_line(server_message)}"
    return line


def plan_upload(output_dir, repo_id: str, include: Sequence[str] = ()) -> Upload:
    """Check `output_dir` (`check_push_folder`) and list what a push uploads; nothing is written anywhere.

    The list: config.json, generation_config.json, the weights `from_pretrained` reads (one file, or index and
    shards), the tokenizer files, the code files config.json and tokenizer_config.json name in `auto_map`, the
    card, the results JSON files, and each `include` path (relative to `output_dir`). A directory without a
    README.md gets a card generated from its config and results (into the upload only: push never writes into
    the directory it shares, so a read-only or half-copied folder is left exactly as it was).
    """
    output_dir = Path(output_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid repo id {repo_id!r}: {error}") from None
    config, tokenizer, code_files = check_push_folder(output_dir)
    tokenizer_files = TOKENIZER_FILES + sorted(type(tokenizer).vocab_files_names.values())
    chat_templates = sorted(f"{EXTRA_CHAT_TEMPLATES}/{path.name}" for path in (output_dir / EXTRA_CHAT_TEMPLATES).glob("*.jinja"))
    weights = [str(path.relative_to(output_dir)) for path in weight_files(output_dir)]
    if weights != [WEIGHTS]:  # shards: their index goes with them
        weights.append(WEIGHTS_INDEX)
    candidates = [*MODEL_FILES, *weights, *code_files, *tokenizer_files, *chat_templates, CARD, *RESULT_FILES]
    files = sorted({name for name in candidates if (output_dir / name).is_file()} | set(map(checked_include_name, include)))
    for name in files:
        check_inside(output_dir, name)
    if CARD in files:
        return Upload(output_dir, files)
    results = next((read_json_object(output_dir / name) for name in RESULT_FILES if (output_dir / name).is_file()), {})
    card = render_model_card(config, model_name=repo_id, eval_results=results, training={})
    return Upload(output_dir, files, generated_card=str(card))


def checked_include_name(name: str) -> str:
    """An --include path as the repository will hold it: relative, inside the directory, a file."""
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"--include {name}: give a path relative to the output dir, inside it")
    return path.as_posix()


def check_inside(output_dir: Path, name: str) -> None:
    """`output_dir/name` is a regular file whose real location is inside `output_dir` (a link out is refused)."""
    path = output_dir / name
    if not path.is_file():
        raise ValueError(f"{path} is not a file in {output_dir}")
    if not path.resolve().is_relative_to(output_dir.resolve()):
        raise ValueError(f"{path} is a link to {path.resolve()}, outside {output_dir}: push uploads only files inside "
                         "the directory; copy the file in if it belongs to the model")


def check_push_folder(output_dir: Path):
    """Everything a `from_pretrained(repo_id, trust_remote_code=True)` will need is here and consistent.

    Returns the config, the tokenizer and the code files both `auto_map`s need. The card, when present, must parse;
    a missing one is generated.
    """
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
    code_files = code_files_of(output_dir, "config.json")
    check_weights(output_dir, config)
    if not (output_dir / "tokenizer_config.json").is_file():
        raise ValueError(f"{output_dir} has no tokenizer_config.json: save the tokenizer with tokenizer.save_pretrained(...)")
    code_files += code_files_of(output_dir, "tokenizer_config.json")  # a BPE tokenizer (tokenizer.json) needs none
    try:
        tokenizer = AutoTokenizer.from_pretrained(output_dir)
    except OSError as error:
        raise ValueError(f"the tokenizer in {output_dir} could not be loaded: {first_line(error)}") from None
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer in {output_dir} has {len(tokenizer)} tokens, more than the model's vocab_size {config.vocab_size}")
    if (output_dir / CARD).is_file():
        try:
            ModelCard.load(output_dir / CARD)
        except ValueError as error:
            raise ValueError(f"{output_dir}/{CARD} is not a valid model card: {error}") from None
    return config, tokenizer, code_files


def code_files_of(output_dir: Path, json_name: str) -> list[str]:
    """The code files the JSON file's `auto_map` names, and the files they import relatively; each must sit beside it."""
    auto_map = read_json_object(output_dir / json_name).get("auto_map") or {}
    references = [value for values in auto_map.values() for value in (values if isinstance(values, list) else [values])]
    modules = {reference.rsplit(".", 1)[0] for reference in references if reference and "--" not in reference}
    names = set()
    for module in sorted(modules):
        module_file = output_dir / f"{module}.py"
        try:
            files = [module_file, *map(Path, get_relative_import_files(module_file))]
        except FileNotFoundError as error:
            raise ValueError(f"{output_dir} lacks the code file {Path(error.filename).name} that {json_name} needs") from None
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise ValueError(f"{output_dir} lacks the code file(s) {', '.join(missing)} that {json_name} needs")
        names.update(path.name for path in files)
    return sorted(names)


def check_weights(output_dir: Path, config) -> None:
    """The weights are readable and finite (`check_saved_weights`), and their tensor names and shapes equal those
    of the model the config builds.

    The model is built on the meta device (no memory); weights tied to another (`all_tied_weights_keys`) may be
    absent from the files, since `save_pretrained` stores them once, and so may what `from_pretrained` loads without
    (`_keys_to_ignore_on_load_missing`: the MoE balancing bias, which older checkpoints lack).
    """
    saved = check_saved_weights(output_dir)
    architecture = (config.architectures or [RamanujanForCausalLM.__name__])[0]
    model_class = getattr(modeling_ramanujan, architecture, None)
    if model_class is None:
        raise ValueError(f"{output_dir}/config.json names architecture {architecture!r}, which acx_ramanujan does not define")
    with init_empty_weights():
        model = model_class(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    optional = re.compile("|".join(model._keys_to_ignore_on_load_missing) or "(?!)")
    missing = sorted(name for name in set(expected) - set(saved) - set(model.all_tied_weights_keys)
                     if not optional.search(name))
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acx-rt push", description="Push a saved model directory to the Hugging Face Hub in one commit.")
    parser.add_argument("output_dir", help="directory written by `acx-rt train` / `acx-rt finetune` (or save_pretrained)")
    parser.add_argument("repo_id", help="namespace/name on the Hub")
    parser.add_argument("--private", action="store_true",
                        help="create the repository as private; refused for an existing public repository")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--commit_message", help="commit message (default: 'Upload <dir> with acx-rt push')")
    parser.add_argument("--include", action="append", default=[], metavar="FILE",
                        help="also upload FILE (a path inside output_dir); repeat for several")
    parser.add_argument("--dry_run", action="store_true", help="check the directory, list what would be uploaded, and exit "
                        "without contacting the Hub")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    return run_command("acx-rt push", lambda: checked_upload(parse_args(argv)), push)


def checked_upload(args: argparse.Namespace) -> argparse.Namespace:
    """The folder and repo id, checked before the Hub is contacted; --dry_run lists the upload here."""
    upload = plan_upload(args.output_dir, args.repo_id, args.include)
    if args.dry_run:
        upload.announce(args.repo_id, "would upload")
    return args


def push(args: argparse.Namespace) -> None:
    if args.dry_run:
        return
    try:
        commit = push_to_hub(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
                             commit_message=args.commit_message, include=args.include)
    except httpx2.TransportError as error:
        raise WorkFailed(f"cannot reach the Hub at {constants.ENDPOINT}: {error}") from None
    except (ValueError, HfHubHTTPError) as error:  # Hub errors span several lines (status, url, hints, message)
        raise WorkFailed(hub_error_line(error)) from None
    print(f"pushed {args.output_dir} to {commit.commit_url}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
