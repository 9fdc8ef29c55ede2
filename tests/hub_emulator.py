"""A local stand-in for the Hugging Face Hub, for tests that push and pull through the genuine client.

It implements the requests `huggingface_hub` 2.4 makes (read from its source: `hf_api.py`, `_commit_api.py`,
`file_download.py`, `utils/_http.py`) for what model sharing needs:

  GET  /api/whoami-v2                                  who the token belongs to
  POST /api/validate-yaml                              README metadata check before a commit
  POST /api/repos/create                               create_repo (409 when it exists)
  DELETE /api/repos/delete                             delete_repo
  POST /api/models/{repo}/branch/{branch}              create_branch (409 when it exists)
  POST /api/models/{repo}/preupload/{revision}         upload mode per file: always "regular", so the client
                                                       inlines every file (base64) in the commit and never
                                                       tries the LFS or Xet upload protocols
  POST /api/models/{repo}/commit/{revision}            the ndjson commit (header, file, deletedFile, deletedFolder)
  GET  /api/models/{repo}[/revision/{revision}]        model_info / repo_info, with the file list
  GET  /api/models/{repo}/tree/{revision}[/{path}]     list_repo_tree
  HEAD/GET /{repo}/resolve/{revision}/{path}           file metadata (ETag = git blob sha1, X-Repo-Commit,
                                                       Content-Length) and content

Every commit is kept (a full snapshot of the files), so any commit sha is a revision. Writes need a known
token (401 otherwise); private repos are invisible (404 RepoNotFound, as on the Hub) without one.
`fail_next_download(path, after_bytes)` drops the connection after `after_bytes` of that file's body; with
`go_away=True` the emulator then stops answering until `start()` is called again. `fail_next_commit()` refuses
the next commit (400). `bodies` keeps every request body received, for tests that look for leaked secrets.
"""

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "test-user"


def git_blob_sha1(content: bytes) -> str:
    """The oid git (and the Hub's ETag for non-LFS files) gives a file: sha1 of "blob <size>\\0" + content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def commit(self, parent: Commit | None, message: str, files: dict[str, bytes]) -> Commit:
        payload = json.dumps([parent.sha if parent else None, message, sorted((p, git_blob_sha1(c)) for p, c in files.items()), len(self.commits)])
        commit = Commit(hashlib.sha1(payload.encode()).hexdigest(), parent.sha if parent else None, message, files)
        self.commits[commit.sha] = commit
        return commit


class HubError(Exception):
    """An error response: status, the Hub's X-Error-Code (which the client maps to exception types), message."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.body = status, message, code, commit, body or {}


class HubEmulator:
    """Start with `start()`; `url` is what HF_ENDPOINT (or `HfApi(endpoint=...)`) should point at."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_emulator_write_token",)):
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # method, path
        self.bodies: list[bytes] = []  # every request body, in order
        self.commit_failure: str | None = None
        self.lock = threading.RLock()
        self.port = 0  # the first start() picks a free port; later starts reuse it
        self.server: ThreadingHTTPServer | None = None
        self.gone = threading.Event()
        self.failure: tuple[str, int, bool] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HubEmulator":
        emulator = self

        class Handler(HubRequestHandler):
            hub = emulator

        self.gone.clear()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop answering: the listening socket closes and open keep-alive connections are dropped."""
        self.gone.set()
        if self.server is not None:
            server, self.server = self.server, None
            server.shutdown()
            server.server_close()

    def fail_next_download(self, path: str, after_bytes: int, go_away: bool) -> None:
        """The next GET of `path` sends `after_bytes` of the body and drops the connection; then, with `go_away`,
        the emulator stops (see `stop`), else it keeps serving (the client retries)."""
        self.failure = (path, after_bytes, go_away)

    def fail_next_commit(self, message: str = "the emulator refuses this commit") -> None:
        """The next commit request is answered 400 with `message`; nothing is committed."""
        self.commit_failure = message

    # -- repository operations, shared by the handler ------------------------------------------------------------

    def repo(self, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token not in self.tokens):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def create_repo(self, name: str, organization: str | None, private: bool) -> str:
        repo_id = f"{organization or USER}/{name}"
        with self.lock:
            if repo_id in self.repos:
                # The Hub's 409 still carries the url; create_repo(exist_ok=True) reads it.
                raise HubError(409, "You already created this model repo", body={"url": f"{self.url}/{repo_id}"})
            repo = Repo(repo_id, private)
            # The Hub starts every repo with a commit holding .gitattributes.
            initial = repo.commit(None, "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            repo.branches["main"] = initial.sha
            self.repos[repo_id] = repo
        return repo_id

    def delete_repo(self, name: str, organization: str | None) -> None:
        repo_id = f"{organization or USER}/{name}"
        with self.lock:
            if self.repos.pop(repo_id, None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")

    def apply_commit(self, repo: Repo, revision: str, lines: list[dict]) -> Commit:
        with self.lock:
            if self.commit_failure is not None:
                message, self.commit_failure = self.commit_failure, None
                raise HubError(400, message)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
            parent = repo.commits[repo.branches[revision]]
            header = next((line["value"] for line in lines if line["key"] == "header"), {})
            if header.get("parentCommit") not in (None, parent.sha):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                elif key == "lfsFile":
                    raise HubError(400, "this emulator stores every file inline; preupload never asks for LFS")
                elif key != "header":
                    raise HubError(400, f"unknown commit operation {key!r}")
            commit = repo.commit(parent, header.get("summary", ""), files)
            repo.branches[revision] = commit.sha
            return commit


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every response carries Content-Length
    hub: HubEmulator

    def log_message(self, *args):  # quiet: tests read `hub.requests` instead
        pass

    # -- plumbing -------------------------------------------------------------------------------------------

    def handle_one_request(self):
        if self.hub.gone.is_set():  # gone away: drop the connection without answering
            self.close_connection = True
            return
        super().handle_one_request()

    def do_GET(self):
        self.dispatch()

    def do_HEAD(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    def dispatch(self):
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.segments = [unquote(part) for part in split.path.strip("/").split("/")]
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        with self.hub.lock:
            self.hub.requests.append((self.command, split.path))
            self.hub.bodies.append(self.body)
        try:
            self.route()
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            self.send_json({"error": error.message, **error.body}, status=error.status, headers=headers)

    def token(self) -> str | None:
        authorization = self.headers.get("Authorization", "")
        return authorization.removeprefix("Bearer ").strip() or None

    def require_token(self) -> str:
        token = self.token()
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def send_json(self, payload, status: int = 200, headers: dict | None = None):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- routes -----------------------------------------------------------------------------------------------

    def route(self):
        s, method = self.segments, self.command
        if s[:2] == ["api", "whoami-v2"] and method == "GET":
            self.require_token()
            return self.send_json({"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token", "accessToken": {"displayName": "emulator", "role": "write"}}})
        if s[:2] == ["api", "validate-yaml"] and method == "POST":
            return self.send_json({"errors": [], "warnings": []})
        if s[:3] == ["api", "repos", "create"] and method == "POST":
            self.require_token()
            payload = json.loads(self.body)
            private = payload.get("visibility") == "private" or payload.get("private") is True  # 2.x sends visibility
            repo_id = self.hub.create_repo(payload["name"], payload.get("organization"), private)
            return self.send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})
        if s[:3] == ["api", "repos", "delete"] and method == "DELETE":
            self.require_token()
            payload = json.loads(self.body)
            self.hub.delete_repo(payload["name"], payload.get("organization"))
            return self.send_json({})
        if s[:2] == ["api", "models"] and len(s) >= 4:
            return self.route_model_api(f"{s[2]}/{s[3]}", s[4:])
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        raise HubError(404, f"the emulator does not implement {method} {self.path}")

    def route_model_api(self, repo_id: str, rest: list[str]):
        method = self.command
        if method == "GET" and not rest:
            return self.model_info(repo_id, "main")
        if method == "GET" and rest[0] == "revision" and len(rest) == 2:
            return self.model_info(repo_id, rest[1])
        if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
            return self.tree(repo_id, rest[1], "/".join(rest[2:]))
        if method == "POST" and rest[0] in ("branch", "preupload", "commit") and len(rest) == 2:
            token = self.require_token()
            repo = self.hub.repo(repo_id, token)
            if rest[0] == "branch":
                return self.create_branch(repo, rest[1])
            if rest[0] == "preupload":
                return self.preupload(repo, rest[1])
            return self.commit(repo, rest[1])
        raise HubError(404, f"the emulator does not implement {method} {self.path}")

    def model_info(self, repo_id: str, revision: str):
        repo = self.hub.repo(repo_id, self.token())
        commit = self.hub.revision(repo, revision)
        siblings = [{"rfilename": path, "size": len(content), "blobId": git_blob_sha1(content)} for path, content in sorted(commit.files.items())]
        config = json.loads(commit.files["config.json"]) if "config.json" in commit.files else None
        self.send_json({"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.sha,
                        "private": repo.private, "gated": False, "disabled": False, "library_name": "transformers",
                        "tags": [], "siblings": siblings, "config": config})

    def tree(self, repo_id: str, revision: str, folder: str):
        repo = self.hub.repo(repo_id, self.token())
        commit = self.hub.revision(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path, content in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix):]
            parts = relative.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": path})
        if folder and not entries and not folders:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound", commit.sha)
        entries += [{"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path} for path in sorted(folders)]
        self.send_json(entries)

    def create_branch(self, repo: Repo, branch: str):
        payload = json.loads(self.body or b"{}")
        with self.hub.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: {branch}")
            start = self.hub.revision(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start.sha
        self.send_json({})

    def preupload(self, repo: Repo, revision: str):
        commit = repo.resolve(revision)
        existing = commit.files if commit else {}
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha1(existing[f["path"]]) if f["path"] in existing else None}
            for f in json.loads(self.body)["files"]
        ]
        self.send_json({"files": files, "commitOid": commit.sha if commit else None})

    def commit(self, repo: Repo, revision: str):
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        commit = self.hub.apply_commit(repo, revision, lines)
        self.send_json({"success": True, "commitOid": commit.sha, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit.sha}", "pullRequestUrl": None})

    def resolve(self, repo_id: str, revision: str, path: str):
        repo = self.hub.repo(repo_id, self.token())
        commit = self.hub.revision(repo, revision)
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.sha)
        content = commit.files[path]
        # Range requests get the whole file (200): the client's resume path accepts that and starts over.
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", f'"{git_blob_sha1(content)}"')
        self.send_header("X-Repo-Commit", commit.sha)
        self.end_headers()
        if self.command == "HEAD":
            return
        failure = self.hub.failure
        if failure is not None and failure[0] == path:
            _, after_bytes, go_away = failure
            self.hub.failure = None
            if go_away:
                self.hub.gone.set()
                threading.Thread(target=self.hub.stop, daemon=True).start()
            self.wfile.write(content[:after_bytes])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(content)
