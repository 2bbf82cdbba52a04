"""A local stand-in for the Hugging Face Hub's HTTP API: the endpoints ``create_repo``, ``create_branch`` and
``upload_folder`` call (repos/create, branch, validate-yaml, preupload, commit), answering as the Hub does and
recording what would have been committed, byte for byte. Every file is answered as a "regular" (inline) upload,
so no LFS or Xet storage is involved; huggingface_hub's own code builds the requests.

Use the ``fake_hub`` fixture (conftest.py): it points huggingface_hub at the server, leaves offline mode and Xet
off for the test, and yields the server's :class:`Record`."""
from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Record:
    endpoint: str = ""
    repos: dict = field(default_factory=dict)  # repo id -> {"private": bool}
    branches: list = field(default_factory=list)  # (repo id, branch)
    commits: list = field(default_factory=list)  # {"repo", "revision", "message", "files": {path: bytes}}
    authorizations: list = field(default_factory=list)  # every Authorization header seen
    refuse: bool = False  # answer 403 to everything (a token without write access)

    def files(self, revision: str = "main") -> dict:
        out = {}
        for c in self.commits:
            if c["revision"] == revision:
                out.update(c["files"])
        return out


def _handler(record: Record):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            record.authorizations.append(self.headers.get("Authorization"))
            if record.refuse:
                return self._send(403, {"error": "You don't have the rights to create a model under this namespace"})
            parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
            if parts[:3] == ["api", "repos", "create"]:
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                private = req.get("visibility", "private" if req.get("private") else "public") != "public"
                record.repos.setdefault(repo, {"private": private})
                return self._send(200, {"url": f"{record.endpoint}/{repo}"})
            if parts[:2] == ["api", "validate-yaml"]:
                return self._send(200, {"errors": [], "warnings": []})
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo, verb, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                if verb == "branch":
                    record.branches.append((repo, rev))
                    return self._send(200, {})
                if verb == "preupload":
                    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                             for f in json.loads(body)["files"]]
                    return self._send(200, {"files": files})
                if verb == "commit":
                    return self._commit(repo, rev, body)
            return self._send(404, {"error": f"fake hub: no endpoint {self.path}"})

        def _commit(self, repo: str, rev: str, body: bytes):
            commit = {"repo": repo, "revision": rev, "message": None, "files": {}}
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    commit["message"] = item["value"]["summary"]
                elif item["key"] == "file":
                    commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                else:
                    return self._send(400, {"error": f"fake hub: unexpected {item['key']}"})
            record.commits.append(commit)
            oid = f"{len(record.commits):040x}"
            return self._send(200, {"commitUrl": f"{record.endpoint}/{repo}/commit/{oid}", "commitOid": oid,
                                    "pullRequestUrl": None})

    return Handler


class FakeHub:
    def __init__(self):
        self.record = Record()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.record))
        self.record.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Record:
        self.thread.start()
        return self.record

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
