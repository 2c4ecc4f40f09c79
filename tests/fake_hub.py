"""A local stand-in for the Hub's HTTP API, enough for `create_repo` + `upload_folder` (files sent inline) and for
downloading a file of a repo (`hf_hub_download`: HEAD then GET of `/{repo}/resolve/{revision}/{path}`)."""

import base64
import hashlib
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub(ThreadingHTTPServer):
    """Records every request and the files of every commit; with `fail=True` answers every request with 500."""

    def __init__(self, fail: bool = False, hang: float = 0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail, self.hang = fail, hang  # hang: seconds each commit waits before it is answered
        self.requests: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()  # Authorization headers seen
        self.commits: list[dict] = []  # {"repo", "summary", "files": {path: bytes}}
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commit": oid}
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self):
        self._serve_file(send_body=False)

    def do_GET(self):
        self._serve_file(send_body=True)

    def _serve_file(self, send_body: bool):
        """A file of a repo at its newest commit (any revision name is taken for the newest)."""
        self.server.requests.append((self.command, self.path))
        parts = urllib.parse.unquote(self.path.split("?")[0]).strip("/").split("/")
        repo = "/".join(parts[:2])
        if self.server.fail or len(parts) < 5 or parts[2] != "resolve" or repo not in self.server.repos:
            return self._reply(500 if self.server.fail else 404, {"error": "not served by the fake hub"})
        content = self.server.repos[repo]["files"].get("/".join(parts[4:]))
        if content is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.server.repos[repo]["commit"])
        self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if send_body:
            self.wfile.write(content)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        self.server.requests.append(("POST", path))
        self.server.authorizations.add(self.headers.get("Authorization", ""))
        if self.server.fail:
            return self._reply(500, {"error": "the fake hub is failing on purpose"})
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            self.server.repos.setdefault(repo, {"private": payload.get("visibility") == "private", "files": {}})
            return self._reply(200, {"url": f"{self.server.endpoint}/{repo}", "name": repo})
        if path == "/api/validate-yaml":
            return self._reply(200, {})
        repo, action = self._repo_action(path)
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if action == "commit":
            time.sleep(self.server.hang)
            return self._commit(repo, body)
        self._reply(404, {"error": f"unknown route {path}"})

    @staticmethod
    def _repo_action(path: str):
        # /api/models/ORG/NAME/preupload/main, /api/models/ORG/NAME/commit/main
        parts = path.strip("/").split("/")
        return "/".join(parts[2:4]), parts[4] if len(parts) > 4 else None

    def _commit(self, repo: str, body: bytes):
        if repo not in self.server.repos:
            return self._reply(404, {"error": f"repository {repo} not found"})
        commit = {"repo": repo, "summary": None, "files": {}, "deleted": []}
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                commit["summary"] = item["value"]["summary"]
            elif item["key"] == "file":
                commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                commit["deleted"].append(item["value"]["path"])
        self.server.commits.append(commit)
        self.server.repos[repo]["files"].update(commit["files"])
        oid = f"{len(self.server.commits):040x}"
        self.server.repos[repo]["commit"] = oid
        self._reply(200, {"commitUrl": f"{self.server.endpoint}/{repo}/commit/{oid}", "commitOid": oid})


def push_with_save_pretrained(folder, repo_id: str, work_dir) -> dict:
    """Load a saved MoE-BERT with AutoModel in a fresh process and `save_pretrained(push_to_hub=True)` it to a FakeHub;
    returns the repo's files {path: bytes}."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (f"import sys; sys.path.insert(0, {str(root)!r})\n"
              "from transformers import AutoModel\n"
              f"model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
              f"model.save_pretrained({str(Path(work_dir) / 'out')!r}, push_to_hub=True, repo_id={repo_id!r}, token='t')\n")
    with FakeHub() as hub:
        env = os.environ | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(Path(work_dir) / "hf-home")}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return hub.repos[repo_id]["files"]
