"""The asset cache: folders built once per study by whichever process needs them first,
published atomically, and verified before they are used.

- **Once**: a folder is built under a file lock (the processes of one machine) and, with
  an S3 artifact location, a database advisory lock (the machines); the others wait, then
  use it. A build happens in ``<name>.tmp-<pid>`` and is renamed into place: no reader ever
  sees half a folder; a build interrupted by an error or a stop is removed.
- **Verified**: every folder carries ``MANIFEST.json`` (each file's size and SHA-256),
  written last. A process checks it the first time it opens the folder: a file changed,
  truncated or missing since (a disk error, a careless edit) is an infrastructure fault
  naming the folder to delete (exit 4), never a trial's. The check of a folder fetched
  from S3 is the fetch itself (``S3Bucket.fetch`` checks every hash).
- **Shared**: with S3, the first machine publishes what it built (``S3Bucket.publish``);
  the others fetch that copy, so every trial on every machine sees the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from kdsearch.service.artifacts import ArtifactLocation, S3Bucket, require_writable
from kdsearch.service.errors import InfrastructureError, first_line
from kdsearch.service.storage import assets_lock, file_lock

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file of ``folder`` (size, SHA-256) in its MANIFEST.json."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def manifest_problem(folder: Path) -> str | None:
    """What in ``folder`` differs from its manifest, or None when everything matches."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MANIFEST} cannot be read ({first_line(exc)})"
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file():
            return f"{relative} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{relative} has {path.stat().st_size} bytes, not {expected['size']}"
        if sha256_of(path) != expected["sha256"]:
            return f"{relative} does not match its SHA-256"
    return None


@dataclass
class AssetCache:
    """Where study assets are built once and kept.

    ``local`` is this machine's folder; with a shared filesystem it serves every machine.
    With an S3 artifact location, ``shared`` holds the published copies that other
    machines fetch instead of recomputing, and ``lock(name)`` (a database advisory lock)
    makes one machine build while the others wait.
    """

    local: Path
    shared: S3Bucket | None = None
    lock: Callable[[str], AbstractContextManager[None]] | None = None
    _verified: set[Path] = field(default_factory=set)

    def folder(self, name: str, what: str, build: Callable[[Path], None]) -> Path:
        """``local/name``, built by ``build(tmp)`` (or fetched) by the first process that
        needs it while the others wait, published atomically, verified against its
        manifest once per process."""
        folder = self.local / name
        try:
            with file_lock(folder.with_suffix(".lock")):  # processes of this machine
                if folder.is_dir():
                    logger.info("reusing %s from %s", what, folder)
                else:
                    with _scratch(folder) as tmp:
                        if self.shared is None:
                            logger.info("preparing %s in %s (once per study)", what, folder)
                            build(tmp)
                        else:
                            assert self.lock is not None
                            with self.lock(name):  # machines
                                self._fetch_or_build(name, what, tmp, build)
                        write_manifest(tmp)
                        os.replace(tmp, folder)
                    self._verified.add(folder)  # just written: its hashes are its own
        except OSError as exc:  # a read-only, full or missing cache folder
            raise InfrastructureError(
                f"cannot write the asset cache {str(self.local)!r}: {first_line(exc)}. Give a "
                "writable folder (--cache-dir or $KDSEARCH_CACHE, or --artifacts)"
            ) from None
        self.verify(folder, what)
        return folder

    def verify(self, folder: Path, what: str) -> None:
        """Raise ``InfrastructureError`` when ``folder`` no longer matches its manifest."""
        if folder in self._verified:
            return
        problem = manifest_problem(folder)
        if problem is not None:
            raise InfrastructureError(
                f"the {what} in {str(folder)!r} are damaged: {problem}. Delete that folder "
                "so that the next worker rebuilds it, and check the disk it is on"
            )
        self._verified.add(folder)

    def _fetch_or_build(
        self, name: str, what: str, tmp: Path, build: Callable[[Path], None]
    ) -> None:
        assert self.shared is not None
        if not self.shared.is_published(name):
            logger.info("preparing %s (once per study, published to S3)", what)
            build(tmp)
            if self.shared.publish(tmp, name):
                return
            # Another machine published first (our lock was lost): use its copy, so that
            # every machine distils from the same teacher outputs.
            shutil.rmtree(tmp)
            tmp.mkdir()
        logger.info("fetching %s from S3", what)
        self.shared.fetch(name, tmp)


@contextmanager
def _scratch(folder: Path) -> Iterator[Path]:
    """A fresh ``<folder>.tmp-<pid>`` to build in, removed if the build does not finish
    (an error, a stop signal); leftovers of dead processes are removed first."""
    for stale in folder.parent.glob(f"{folder.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_asset_cache(
    location: ArtifactLocation,
    cache_dir: Path,
    storage: optuna.storages.RDBStorage,
    shared: S3Bucket | None = None,
) -> AssetCache:
    """The asset cache for an artifact location (``shared``: an already opened bucket);
    its folder must be writable (checked now, not after a trial)."""
    try:
        require_writable(cache_dir)
    except OSError as exc:
        raise InfrastructureError(
            f"cannot write the asset cache {str(cache_dir)!r}: {first_line(exc)}. Give a "
            "writable folder (--cache-dir or $KDSEARCH_CACHE, or --artifacts)"
        ) from None
    if not location.is_s3:
        return AssetCache(cache_dir)
    return AssetCache(
        cache_dir, shared or S3Bucket(location), functools.partial(assets_lock, storage)
    )
