"""Result cache keyed by a hash of the inputs each artefact depends on.

Layout: ``<root>/<kind>/<key>.pt`` (the payload, ``torch.save``) and ``<key>.json``
(its metadata: inputs, SHA-256 of the payload). Both are written to a temporary
file and renamed; the JSON is written last, so an entry without it is partial.
On load the payload's checksum is verified; a partial or corrupt entry is
logged, removed and recomputed, never loaded.

Processes that share the cache (the runner's ``--jobs`` workers) never compute the same entry twice:
a process computes an entry holding an exclusive lock on ``<kind>/.<key>.lock`` (``fcntl.flock``;
the file is removed when the computation ends), and one that finds it held waits, then loads what
the other stored. Locks are taken in the order
entries are built on one another, so they cannot deadlock. The metadata records how long the
computation took (``seconds``, and ``self_seconds`` without the entries it computed on the way)
and which task of the runner computed it (``task``, from ``$IMPACT_TASK``): the build's profile.

Every kind of entry is declared once with the version of the code that computes it
(:func:`artefact`, beside its entry point) and the version is part of every key, so an entry
computed by older code is never served as new: bump the version when the computation
changes. Entries built on others carry those entries' keys in their inputs, so a bump
recomputes the kind and everything built on it, and nothing else.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import config_hash
from .distributed import barrier, is_main, world_size

log = logging.getLogger("impact_core")


class CacheError(RuntimeError):
    """A cache entry is corrupt or partial."""


VERSIONS: dict[str, int] = {}
"""Kind of cached artefact -> version of the code that computes it (filled by :func:`artefact`)."""


SERVED: dict[tuple[str, str], None] = {}
"""``(kind, key)`` of every entry this process loaded or computed, in first-use order (the
"reproduce this page" box lists the models a chapter read)."""


def artefact(kind: str, version: int) -> str:
    """Declare a cached kind and its code version; returns ``kind`` (``NEURON = artefact("neuron_metrics", 3)``)."""
    if VERSIONS.get(kind, version) != version:
        raise ValueError(f"cache kind {kind!r} is declared twice, with versions {VERSIONS[kind]} and {version}")
    VERSIONS[kind] = version
    return kind


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(fileobj)`` into a temporary file beside ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temporaries(folder: Path, quiet_seconds: float = 60.0) -> list[Path]:
    """Temporary files of :func:`atomic_write_bytes` whose writer is gone: the process id in
    the name (``.<name>.<pid>.<random>.tmp``) is not running on this host and the file has not
    been written for ``quiet_seconds`` (a write in progress on another host sharing the folder
    keeps touching it). A write killed mid-way (``kill -9``) leaves such a file behind."""
    out = []
    for tmp in folder.glob(".*.tmp"):
        parts = tmp.name.split(".")
        try:
            pid = int(parts[-3])
            age = time.time() - tmp.stat().st_mtime
        except (ValueError, IndexError, FileNotFoundError):
            continue
        if not _alive(pid) and age > quiet_seconds:
            out.append(tmp)
    return out


class ResultCache:
    """``cache.get_or_compute(kind, inputs, compute)``: load if present and intact, else compute and store."""

    def __init__(self, root: str | Path, salt: Optional[dict] = None):
        self.root = Path(root)
        self.salt = salt or {}  # settings every key records (e.g. bf16 precision); none by default

    def key(self, kind: str, inputs: dict) -> str:
        """The entry's name: a hash of its kind, the kind's code version and its inputs."""
        if kind not in VERSIONS:
            raise KeyError(f"cache kind {kind!r} is not declared: declare it with cache.artefact({kind!r}, version)")
        return config_hash({"kind": kind, "version": VERSIONS[kind], "inputs": {**inputs, **self.salt}})

    def paths(self, kind: str, key: str) -> tuple[Path, Path]:
        base = self.root / kind
        return base / f"{key}.pt", base / f"{key}.json"

    def load(self, kind: str, key: str) -> Any:
        """Load an entry; raise :class:`CacheError` if it is partial or corrupt, KeyError if absent."""
        payload, meta = self.paths(kind, key)
        if not payload.exists() and not meta.exists():
            raise KeyError(f"{kind}/{key}")
        if not meta.exists():
            raise CacheError(f"{kind}/{key}: payload without metadata (partial write)")
        if not payload.exists():
            raise CacheError(f"{kind}/{key}: metadata without payload")
        try:
            info = json.loads(meta.read_text())
        except json.JSONDecodeError as err:
            raise CacheError(f"{kind}/{key}: unreadable metadata ({err})") from err
        if info.get("sha256") != _sha256(payload):
            raise CacheError(f"{kind}/{key}: checksum mismatch (corrupt payload)")
        try:
            return torch.load(payload, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CacheError(f"{kind}/{key}: payload could not be read ({err})") from err

    def save(self, kind: str, key: str, value: Any, inputs: dict, timing: Optional[dict] = None) -> None:
        """Store an entry; ``timing`` (``seconds``, ``self_seconds``) goes into its metadata."""
        payload, meta = self.paths(kind, key)
        atomic_write_bytes(payload, lambda f: torch.save(value, f))
        info = {"kind": kind, "key": key, "inputs": inputs, "sha256": _sha256(payload),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "task": os.environ.get("IMPACT_TASK"),
                "threads": torch.get_num_threads(), **(timing or {})}
        text = json.dumps(info, indent=1, sort_keys=True, default=str).encode()
        atomic_write_bytes(meta, lambda f: f.write(text))

    def remove(self, kind: str, key: str) -> None:
        for p in self.paths(kind, key):
            if p.exists():
                p.unlink()

    @contextlib.contextmanager
    def _exclusive(self, kind: str, key: str):
        """Hold ``<kind>/.<key>.lock`` while computing the entry (not under torchrun, whose
        processes compute one entry together). Time spent waiting is not this process's compute."""
        if world_size() > 1:
            yield
            return
        path = self.root / kind / f".{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("cache: waiting for another process computing %s/%s", kind, key)
                start = time.time()
                fcntl.flock(handle, fcntl.LOCK_EX)
                if _NESTED:
                    _NESTED[-1] += time.time() - start
            try:
                yield
            finally:
                # removed while held: a process still waiting on it re-checks the cache once it has it
                # (and finds the entry); one arriving later locks a new file and finds the entry too
                path.unlink(missing_ok=True)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _try_load(self, kind: str, key: str):
        """``(True, value)`` for an intact entry; ``(False, None)`` when absent or removed as broken."""
        try:
            return True, self.load(kind, key)
        except KeyError:
            return False, None
        except CacheError as err:
            log.warning("cache: %s; recomputing", err)
            self.remove(kind, key)
            return False, None

    def get_or_compute(self, kind: str, inputs: dict, compute: Callable[[], Any]) -> Any:
        key = self.key(kind, inputs)
        SERVED.setdefault((kind, key))
        found, value = self._try_load(kind, key)
        if found:
            log.info("cache: reusing %s/%s", kind, key)
            return value
        with self._exclusive(kind, key):
            found, value = self._try_load(kind, key)  # another process may have stored it meanwhile
            if found:
                log.info("cache: reusing %s/%s (computed by another process)", kind, key)
                return value
            for tmp in stale_temporaries(self.root / kind):
                log.warning("cache: removing %s, left by a write that was killed", tmp)
                tmp.unlink(missing_ok=True)
            log.info("cache: computing %s/%s", kind, key)
            start = time.time()
            _NESTED.append(0.0)
            try:
                value = compute()
            finally:
                nested = _NESTED.pop()
            seconds = time.time() - start
            if _NESTED:
                _NESTED[-1] += seconds
            timing = {"seconds": round(seconds, 3), "self_seconds": round(seconds - nested, 3)}
            if is_main():  # under torchrun every process computes its share; one writes
                self.save(kind, key, value, inputs, timing)
            barrier()
        log.info("cache: stored %s/%s (%.1f s)", kind, key, seconds)
        return value


_NESTED: list[float] = []
"""Per computation in progress in this process (innermost last): seconds spent in the entries it
computed or waited for on the way, which its ``self_seconds`` leaves out."""
