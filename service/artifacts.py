"""Where study assets and trial artifacts live: a folder, or an S3-compatible bucket.

A folder serves one machine, or many when every worker mounts the same shared filesystem
(NFS, a Docker volume). ``s3://BUCKET/PREFIX`` serves workers on any machine that can
reach the bucket: AWS S3 or any S3-compatible store (MinIO, Ceph RGW, Cloudflare R2...).
boto3 finds the credentials and the endpoint the usual way: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` (for a store that is not AWS),
``~/.aws``, instance roles. Nothing secret is read from kdsearch's own options.

Layout, under the folder or under the bucket's prefix::

    optuna/<artifact id>           trial artifacts (optuna's artifact store)
    cache/<name>/...               study assets, in a folder location
    cache/<name>/MANIFEST.json     in S3: the build and its file list, written last
    cache/<name>/files-<build>/... in S3: the files of one build of that folder

With S3, each machine keeps its own copy of the study assets in a local cache folder
(``--cache-dir``, ``$KDSEARCH_CACHE``, else ``~/.cache/kdsearch``) and fetches a published
folder instead of recomputing it. Every S3 call kdsearch makes is in this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from kdsearch.service.errors import InfrastructureError, KdsearchError, first_line

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore

logger = logging.getLogger(__name__)

ARTIFACTS_ENV = "KDSEARCH_ARTIFACTS"
CACHE_ENV = "KDSEARCH_CACHE"
DEFAULT_ARTIFACTS = "kdsearch-artifacts"
MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class ArtifactLocation:
    """A folder (``folder`` set) or an S3 bucket with a key prefix (``bucket`` set)."""

    folder: Path | None = None
    bucket: str | None = None
    prefix: str = ""  # no leading or trailing slash; "" = the bucket's root

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def key(self, *parts: str) -> str:
        """The S3 key of ``parts`` under this location's prefix."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/") if self.is_s3 else str(self.folder)


def explicit_artifacts(cli_value: str | None) -> str | None:
    """The location the user named: ``--artifacts``, else ``$KDSEARCH_ARTIFACTS``."""
    return cli_value or os.environ.get(ARTIFACTS_ENV) or None


def resolve_artifacts(value: str | None) -> ArtifactLocation:
    """A location from its text (a folder, made absolute, or ``s3://BUCKET[/PREFIX]``);
    None gives the default ``./kdsearch-artifacts``."""
    value = value or DEFAULT_ARTIFACTS
    if "://" not in value:
        if "\0" in value:
            raise KdsearchError(f"artifact location {value!r} is not a path; give a folder")
        return ArtifactLocation(folder=Path(value).expanduser().resolve())
    scheme, rest = value.split("://", 1)
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not bucket:
        raise KdsearchError(
            f"artifact location {value!r} is neither a folder nor s3://BUCKET[/PREFIX]; give "
            f"a folder path or an S3 URL (--artifacts or ${ARTIFACTS_ENV})"
        )
    return ArtifactLocation(bucket=bucket, prefix=prefix.strip("/"))


def resolve_cache_dir(location: ArtifactLocation, cli_value: str | Path | None) -> Path:
    """The folder study assets are kept in on this machine. In a folder location it is the
    shared ``cache/`` beside the artifacts, unless ``--cache-dir``/``$KDSEARCH_CACHE``
    names another; with S3, a local one (the published copy lives in the bucket)."""
    value = cli_value or os.environ.get(CACHE_ENV)
    if value:
        return Path(value).resolve()
    if location.folder is not None:
        return location.folder / "cache"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "kdsearch").resolve()


def open_artifact_store(
    location: ArtifactLocation, shared: S3Bucket | None = None
) -> ArtifactStore:
    """Optuna's artifact store at ``location``: the trials' files, shown by the dashboard
    (``shared``: the location's bucket, when the caller has it open already)."""
    if location.folder is not None:
        from optuna.artifacts import FileSystemArtifactStore

        folder = location.folder / "optuna"
        try:
            require_writable(folder)
        except OSError as exc:
            raise InfrastructureError(
                f"cannot use the artifact folder {str(location)!r}: {first_line(exc)}; give a "
                f"writable folder (--artifacts or ${ARTIFACTS_ENV})"
            ) from None
        return FileSystemArtifactStore(str(folder))
    return _PrefixedBoto3Store(shared or S3Bucket(location))


def require_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove it takes a file (raises OSError otherwise): a
    read-only or full location is found at startup, not after a trial's compute."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".kdsearch-write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


class RoutingArtifactStore:
    """Reads an artifact from whichever of several stores holds it: optuna-dashboard
    serves one store, while each study of a storage records its own location."""

    def __init__(self, stores: list[ArtifactStore]) -> None:
        self.stores = stores

    def open_reader(self, artifact_id: str) -> BinaryIO:
        for store in self.stores:
            try:
                return store.open_reader(artifact_id)
            except Exception:  # not in this store (each raises its own "not found")
                continue
        from optuna.artifacts.exceptions import ArtifactNotFound

        raise ArtifactNotFound(f"artifact {artifact_id} is in none of the study locations")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        for store in self.stores:
            try:
                store.remove(artifact_id)
            except Exception:
                continue


def readable_store(location: ArtifactLocation) -> ArtifactStore | None:
    """The artifact store at ``location`` for reading, or None (with one warning) when it
    cannot be read: a missing folder, an unreachable bucket."""
    if location.folder is not None:
        if not (location.folder / "optuna").is_dir():
            logger.warning(
                "artifact folder %s does not exist (or holds no optuna/ folder): the figures "
                "and prediction files of the trials stored there will be missing",
                location,
            )
            return None
        from optuna.artifacts import FileSystemArtifactStore

        return FileSystemArtifactStore(str(location.folder / "optuna"))
    try:
        return _PrefixedBoto3Store(S3Bucket(location))
    except KdsearchError as exc:
        logger.warning("%s: the trials' artifacts stored there will be missing", exc)
        return None


class S3Bucket:
    """The S3 side of a location: published study-asset folders and the artifact bucket.

    Opening it checks that the bucket can be reached, so a wrong endpoint, credentials or
    bucket name fail at startup with one message, not in the middle of a trial.
    """

    def __init__(self, location: ArtifactLocation) -> None:
        assert location.bucket is not None
        self.location = location
        self.bucket = location.bucket
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise KdsearchError(
                f"artifact location {str(location)!r} needs boto3, which is not installed; "
                "install it with `pip install 'kdsearch[s3]'` or use a folder"
            ) from None
        # Trials' uploads ride out a store that blips (standard retries); the startup check
        # does not retry, so a wrong endpoint, key or bucket fails at once.
        patient = Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=10)
        once = Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=10)
        try:
            self.client = boto3.client("s3", config=patient)
            boto3.client("s3", config=once).head_bucket(Bucket=self.bucket)
        except Exception as exc:  # botocore raises many types: endpoint, auth, 404, region
            raise InfrastructureError(
                f"cannot reach the artifact store {str(location)!r}: {first_line(exc)}. Check that "
                "the "
                "bucket exists and the store is up; boto3 reads AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and, for a store that is not AWS (MinIO, Ceph...), "
                f"AWS_ENDPOINT_URL (--artifacts or ${ARTIFACTS_ENV})"
            ) from None

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return True

    def is_published(self, name: str) -> bool:
        return self._exists(self.location.key("cache", name, MANIFEST))

    def publish(self, folder: Path, name: str) -> bool:
        """Upload ``folder`` as ``name``: its files under a key of their own, then the
        manifest that makes them visible. False (nothing published) when another machine
        published ``name`` first; its files are never overwritten."""
        build = uuid.uuid4().hex[:12]
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        files = {
            p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in paths
        }
        for relative in files:
            key = self.location.key("cache", name, f"files-{build}", relative)
            self.client.upload_file(str(folder / relative), self.bucket, key)
        # The lock that serialises publishers can be lost (a database restart); a second
        # look keeps the first published copy the only one.
        if self.is_published(name):
            return False
        manifest = {"build": build, "host": socket.gethostname(), "files": files}
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.location.key("cache", name, MANIFEST),
            Body=json.dumps(manifest, indent=1).encode(),
        )
        logger.info("published %d files to %s", len(files), self.location.key("cache", name))
        return True

    def fetch(self, name: str, dest: Path) -> None:
        """Download published folder ``name`` into ``dest``, checking every file's hash.

        The manifest comes from whoever can write the bucket: its file names are checked
        (relative, no ``..``, inside ``dest``) before anything is written."""
        manifest_key = self.location.key("cache", name, MANIFEST)
        try:
            manifest = json.loads(
                self.client.get_object(Bucket=self.bucket, Key=manifest_key)["Body"].read()
            )
            files, build = manifest["files"], str(manifest["build"])
            if not isinstance(files, dict) or not BUILD_ID.fullmatch(build):
                raise ValueError("unexpected layout")
        except (ValueError, KeyError, TypeError) as exc:
            raise InfrastructureError(
                f"s3://{self.bucket}/{manifest_key} is not a kdsearch manifest ({exc}); delete "
                f"s3://{self.bucket}/{self.location.key('cache', name)}/ so that the next worker "
                "rebuilds it"
            ) from None
        targets = {relative: safe_join(dest, relative, manifest_key) for relative in files}
        for relative, expected in files.items():
            target = targets[relative]
            target.parent.mkdir(parents=True, exist_ok=True)
            key = self.location.key("cache", name, f"files-{manifest['build']}", relative)
            self.client.download_file(self.bucket, key, str(target))
            if _sha256(target) != expected["sha256"]:
                raise InfrastructureError(
                    f"s3://{self.bucket}/{key} does not match its manifest (sha256); delete "
                    f"s3://{self.bucket}/{self.location.key('cache', name)}/ so that the next "
                    "worker rebuilds it"
                )
        logger.info("fetched %d files from %s", len(files), manifest_key)


BUILD_ID = re.compile(r"[0-9a-f]{12}")


def safe_join(root: Path, relative: str, source: str) -> Path:
    """``root / relative`` for a name read from a manifest, refusing any name that would
    land outside ``root``: absolute paths, ``..``, backslashes, empty parts."""
    parts = relative.split("/")
    bad = (
        not relative
        or relative.startswith("/")
        or "\\" in relative
        or "\0" in relative
        or any(p in ("", ".", "..") for p in parts)
    )
    target = (root / relative).resolve()
    if bad or not target.is_relative_to(root.resolve()):
        raise InfrastructureError(
            f"{source} names the file {relative!r}, which is outside the cache folder; the "
            "store holds a tampered or foreign manifest: delete it and let a worker rebuild it"
        )
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _PrefixedBoto3Store:
    """Optuna's Boto3ArtifactStore under the location's ``optuna/`` prefix (optuna's own
    store writes at the bucket's root)."""

    def __init__(self, shared: S3Bucket) -> None:
        from optuna.artifacts import Boto3ArtifactStore

        self._location = shared.location
        self._store = Boto3ArtifactStore(shared.bucket, client=shared.client)

    def _key(self, artifact_id: str) -> str:
        return self._location.key("optuna", artifact_id)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self._store.open_reader(self._key(artifact_id))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._store.write(self._key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        self._store.remove(self._key(artifact_id))
