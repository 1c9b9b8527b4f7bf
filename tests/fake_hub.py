"""A Hugging Face hub for one dataset repository, served on localhost, whose ``main`` can be moved to
a new commit: enough of the hub's API for ``huggingface_hub`` and ``datasets`` streaming to read it.
Point ``HF_ENDPOINT`` at ``FakeHub.url`` before ``huggingface_hub`` is imported."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """Serves ``repo``'s files at each commit pushed; ``main`` is the last one."""

    def __init__(self, repo: str) -> None:
        self.repo = repo
        self.commits: dict[str, dict[str, bytes]] = {}
        self.main = ""
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def push(self, files: dict[str, bytes]) -> str:
        """A new commit holding ``files``; ``main`` moves to it."""
        self.main = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        self.commits[self.main] = files
        return self.main

    def files(self, revision: str) -> dict[str, bytes] | None:
        return self.commits.get(self.main if revision == "main" else revision)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._answer(head=False)

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def log_message(self, *args) -> None:
            pass

        def _answer(self, head: bool) -> None:
            path = urllib.parse.urlparse(self.path).path
            parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
            repo_parts = hub.repo.split("/")
            if parts[:3] == ["datasets", *repo_parts] and parts[3:4] == ["resolve"]:
                return self._file(parts[4], "/".join(parts[5:]), head)
            if parts[:4] == ["api", "datasets", *repo_parts]:
                rest = parts[4:]
                if not rest or rest[0] == "revision":
                    return self._info(rest[1] if rest else "main", head)
                if rest[0] == "tree" and len(rest) == 2:  # the repository's root: every file
                    return self._tree(rest[1], head)
            self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)

        def _info(self, revision: str, head: bool) -> None:
            files = hub.files(revision)
            if files is None:
                return self._send(404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
            sha = hub.main if revision == "main" else revision
            info = {"id": hub.repo, "sha": sha, "siblings": [{"rfilename": f} for f in files], "cardData": {}}
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)

        def _tree(self, revision: str, head: bool) -> None:
            files = hub.files(revision) or {}
            entries = [{"type": "file", "path": f, "size": len(b), "oid": _oid(b)} for f, b in files.items()]
            self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

        def _file(self, revision: str, name: str, head: bool) -> None:
            files = hub.files(revision) or {}
            sha = hub.main if revision == "main" else revision
            if name not in files:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, head)
            body = files[name]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_oid(body)}"', "Accept-Ranges": "bytes"}
            wanted = self.headers.get("Range")
            if wanted and not head:
                first, last = wanted.split("=")[1].split("-")
                last = int(last) if last else len(body) - 1
                headers["Content-Range"] = f"bytes {first}-{last}/{len(body)}"
                return self._send(206, body[int(first) : last + 1], headers, head)
            self._send(200, body, headers, head)

        def _send(self, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
            self.send_response(code)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


def _oid(content: bytes) -> str:
    return hashlib.sha1(content).hexdigest()
