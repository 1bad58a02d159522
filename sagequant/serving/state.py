"""Running engines on this machine: one JSON file per server in a state directory.

A server writes its entry once its socket is bound and removes it when it exits. An entry whose
process is gone (killed, crashed, machine rebooted) or whose pid now belongs to another program
is stale: `list_engines` reports it as such and deletes the file.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

from ..errors import ServingError

STATE_DIR_ENV = "SAGEQUANT_STATE_DIR"


class EngineStateError(ServingError):
    """An engine named by the user is not known or cannot be stopped."""


def state_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override)
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "sagequant" / "engines"


def engine_id(served_name: str, port: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', served_name).strip('-') or 'engine'}-{port}"


def write_entry(directory: Path, entry: dict) -> Path:
    """Atomically write `entry` (must hold id and pid) as <id>.json."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{entry['id']}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entry, indent=1))
    os.replace(tmp, path)
    return path


def remove_entry(directory: Path, ident: str, pid: int) -> None:
    """Remove <id>.json if it is still this process's entry (a restart may have replaced it)."""
    path = directory / f"{ident}.json"
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (FileNotFoundError, json.JSONDecodeError):
        pass


def is_running(pid: int) -> bool:
    """True when `pid` is alive and is a sagequant process (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else: not one of ours
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        if b"sagequant" not in text:
            return False
        return not _is_zombie(pid)
    return True  # no /proc (not Linux): trust the signal check


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def list_engines(directory: Path) -> tuple[list[dict], list[dict]]:
    """(running entries, stale entries removed)."""
    running, stale = [], []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
            pid = int(entry["pid"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError):
            entry, pid = {"id": path.stem, "pid": None}, None
        if pid is not None and is_running(pid):
            running.append(entry)
        else:
            stale.append(entry)
            path.unlink(missing_ok=True)
    return running, stale


def stop_engine(directory: Path, ident: str, timeout: float = 10.0) -> dict:
    """SIGTERM the engine `ident` (SIGKILL after `timeout` s); returns its entry."""
    running, _ = list_engines(directory)
    entry = next((e for e in running if e.get("id") == ident), None)
    if entry is None:
        known = ", ".join(e["id"] for e in running) or "none running"
        raise EngineStateError(f"no running engine {ident!r} in {directory} (running: {known})")
    pid = int(entry["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_running(pid):
        os.kill(pid, signal.SIGKILL)
        entry["killed"] = True
    (directory / f"{ident}.json").unlink(missing_ok=True)
    return entry
