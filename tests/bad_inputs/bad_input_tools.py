"""Helpers of the bad-input catalogue: tamper with artifact files as an attacker would (re-hashing
the manifest so checksums pass), payloads that would create a marker file if they ever ran."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def rehash(d: Path) -> None:
    """Recompute the manifest's sizes and digests, as anyone editing an artifact can."""
    manifest = json.loads((d / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (d / name).read_bytes()
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (d / "manifest.json").write_text(json.dumps(manifest))


def tamper(d: Path, name: str, edit) -> None:
    """Edit one JSON file of an artifact in place (edit mutates the parsed object) and re-hash."""
    data = json.loads((d / name).read_text())
    edit(data)
    (d / name).write_text(json.dumps(data))
    rehash(d)


def payloads(marker: Path) -> list[str]:
    """Strings that would create `marker` if any loader put them into generated Python code."""
    cmd = f"__import__('os').system('touch {marker}')"
    return [f"x=({cmd})", f"x, {cmd}, y", f"x\n{cmd}\n", f"{cmd}#", f"self.x if {cmd} else 0"]


def node(graph: dict, op: str, index: int = 0) -> dict:
    return [n for n in graph["nodes"] if n["op"] == op][index]


def annotated(graph: dict) -> dict:
    return next(n for n in graph["nodes"] if n.get("annotation", {}).get("calibration"))


class InProcessServer:
    """The OpenAI server of a compiled model under uvicorn in a thread, on 127.0.0.1:0."""

    def __init__(self, cm, tokenizer, **opts):
        import threading

        import uvicorn

        from sagequant.serving.launch import ServeOptions, bind, make_app
        self.app, self.served = make_app(cm, tokenizer, ServeOptions(model="tiny", **opts))
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        import time

        import httpx
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(15)
