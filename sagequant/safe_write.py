"""Every file or directory sagequant writes goes through here, so no command deletes or hides a
file it did not write.

A directory output (artifact, compressed-tensors checkpoint, HTML report, IR dump) may go where
nothing is, where an empty directory is, or over a previous sagequant output of that kind (an
artifact recognised by its manifest.json, anything else by the `.sagequant-output.json` marker
listing the files sagequant wrote there): that is replaced atomically. A directory holding
anything else is refused unless the caller passes overwrite=True (CLI `--overwrite`), and even
then only sagequant's own files are replaced; the others stay. A file where a directory is to go
is always refused. A file output (ONNX, TensorRT engine, JSON) replaces an existing file only with
overwrite=True, atomically (temporary sibling, then rename).

Temporary siblings are named `.NAME.sagequant-tmp-PID-*`; one whose process is gone (a killed
save) is removed by the next save to the same path.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ArtifactError

MARKER = ".sagequant-output.json"
_TMP = "sagequant-tmp"
_OLD = "sagequant-old"


class OutputPathError(ArtifactError):
    """An output path holds something sagequant did not write (or a file where a directory goes)."""


def owned_files(directory: Path) -> set[str] | None:
    """Names sagequant wrote in `directory` (by its manifest or marker), or None if it wrote none."""
    for name, key in (("manifest.json", "files"), (MARKER, "files")):
        try:
            record = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("producer") == "sagequant":
            files = record.get(key)
            files = list(files) if isinstance(files, (dict, list)) else []
            return {str(f) for f in files if isinstance(f, str) and "/" not in f} | {name}
    return None


def _foreign(directory: Path) -> list[str]:
    """Entries of an existing directory that sagequant did not write there."""
    entries = sorted(p.name for p in directory.iterdir())
    owned = owned_files(directory) or set()
    return [e for e in entries if e not in owned]


def _check_parents(target: Path, what: str) -> None:
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{what} path {str(target)!r} goes through {str(parent)!r}, which is a "
                              "file, not a directory")


def check_output_dir(path: str | Path, overwrite: bool = False, what: str = "output") -> Path:
    """Fail fast (before a long compile) if writing a directory at `path` would lose files."""
    target = Path(path).absolute()
    _check_parents(target, what)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        kind = "a symbolic link" if target.is_symlink() else "a file, not a directory"
        raise OutputPathError(f"{what} path {str(target)!r} is {kind}; sagequant will not replace "
                              "it (choose another path or remove it yourself)")
    if target.is_dir():
        foreign = _foreign(target)
        if foreign and not overwrite:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputPathError(
                f"{what} directory {str(target)!r} holds files sagequant did not write ({shown}); "
                "refusing to replace it. Choose another path, or pass --overwrite "
                "(API: overwrite=True) to replace only sagequant's own files there")
    return target


def check_output_file(path: str | Path, overwrite: bool = False, what: str = "output",
                      companions: tuple[str, ...] = (), ours=None) -> Path:
    """Fail fast if writing a file at `path` (and `path + suffix` companions) would lose one.
    `ours(path) -> bool` recognises a file sagequant wrote earlier (replaced without overwrite)."""
    target = Path(path).absolute()
    _check_parents(target, what)
    for p in [target, *(target.with_name(target.name + c) for c in companions)]:
        if p.is_dir():
            raise OutputPathError(f"{what} path {str(p)!r} is a directory; sagequant writes a file "
                                  "there and will not replace a directory")
        if p.exists() and not overwrite and not (ours is not None and p.is_file() and ours(p)):
            raise OutputPathError(f"{what} file {str(p)!r} already exists; refusing to replace it. "
                                  "Choose another path, or pass --overwrite (API: overwrite=True)")
    return target


@contextlib.contextmanager
def output_dir(path: str | Path, overwrite: bool = False, what: str = "output"):
    """Yields an empty temporary directory; on success its files become `path` (see module doc).
    A directory without a manifest.json gets the marker listing its files."""
    target = check_output_dir(path, overwrite, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_siblings(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_TMP}-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        if not (tmp / "manifest.json").exists():
            _write_marker(tmp, sorted(p.name for p in tmp.iterdir()))
        check_output_dir(target, overwrite, what)  # again: the compile took a while
        if target.is_dir() and _foreign(target):
            _merge_into(tmp, target)
        else:
            _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def output_file(path: str | Path, overwrite: bool = False, what: str = "output",
                companions: tuple[str, ...] = (), ours=None):
    """Yields a temporary sibling path to write; on success it is renamed onto `path`. Companion
    files the writer puts beside the temporary one (same name + suffix) move along."""
    target = check_output_file(path, overwrite, what, companions, ours)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_siblings(target)
    tmp = target.with_name(f".{target.name}.{_TMP}-{os.getpid()}-{os.urandom(4).hex()}")
    moves = [(tmp.with_name(tmp.name + c), target.with_name(target.name + c)) for c in companions]
    try:
        yield tmp
        check_output_file(target, overwrite, what, companions, ours)
        for src, dst in moves:
            if src.exists():
                os.replace(src, dst)
        os.replace(tmp, target)
    finally:
        for p in [tmp, *(src for src, _ in moves)]:
            if p.exists():
                p.unlink()


class IncrementalDir:
    """A directory filled file by file while work runs (IR dumps: the files written before a
    failing pass are the point, so there is no all-or-nothing commit). The same rules: refused
    over files sagequant did not write unless overwrite; the previous run's files (by the
    marker) are removed first, so stale numbered dumps cannot mislead."""

    def __init__(self, path: str | Path, overwrite: bool = False, what: str = "output"):
        self.dir = check_output_dir(path, overwrite, what)
        self.dir.mkdir(parents=True, exist_ok=True)
        previous = _marker_files(self.dir)
        for name in previous:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (self.dir / name).unlink()
        self.files: list[str] = []
        _write_marker(self.dir, self.files)

    def write_text(self, name: str, text: str) -> Path:
        tmp = self.dir / f".{name}.{_TMP}-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, self.dir / name)
        self.files.append(name)
        _write_marker(self.dir, self.files)
        return self.dir / name


def _marker_files(directory: Path) -> list[str]:
    try:
        record = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return []
    files = record.get("files") if isinstance(record, dict) else None
    return [f for f in files if isinstance(f, str) and "/" not in f and f != MARKER] if isinstance(files, list) else []


def _write_marker(directory: Path, files: list[str]) -> None:
    (directory / MARKER).write_text(json.dumps({"producer": "sagequant", "files": files}, indent=1))


def _replace_dir(tmp: Path, target: Path) -> None:
    """Atomically put `tmp` at `target`, which is absent, empty, or wholly sagequant's."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):  # tmp now holds the previous output
        shutil.rmtree(tmp)
        return
    backup = target.with_name(f".{target.name}.{_OLD}-{os.getpid()}")
    os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(backup, target)  # put the previous output back where it was
        raise
    shutil.rmtree(backup)


def _merge_into(tmp: Path, target: Path) -> None:
    """overwrite=True into a directory with foreign files: replace our files one by one (each
    atomically), drop our files of the previous output that the new one lacks, keep the rest.
    The manifest or marker goes last, so a crash leaves an output that fails its checksums."""
    before = owned_files(target) or set()
    new = sorted(p.name for p in tmp.iterdir())
    last = [n for n in new if n in ("manifest.json", MARKER)]
    for name in [n for n in new if n not in last] + last:
        dst = target / name
        if dst.is_dir() and not dst.is_symlink():
            raise OutputPathError(f"{str(dst)!r} is a directory sagequant did not write; it would "
                                  f"have to replace it with its file {name}")
        os.replace(tmp / name, dst)
    for name in before - set(new):
        with contextlib.suppress(FileNotFoundError):
            (target / name).unlink()


def _clean_stale_siblings(target: Path) -> None:
    """Remove temporaries of earlier saves to `target` whose process is gone (killed mid-save)."""
    prefix = f".{target.name}.{_TMP}-"
    for p in target.parent.glob(f".{target.name}.{_TMP}-*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the C library or
    the file system does not offer it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
