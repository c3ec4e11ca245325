"""Where study assets and trial artifacts live: a folder, or an S3-compatible bucket; which
location each study records; and a trial's files stored all or nothing.

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
from typing import TYPE_CHECKING, Any, BinaryIO

from kdsearch.service.errors import InfrastructureError, KdsearchError, first_line
from kdsearch.service.faults import fault_point

if TYPE_CHECKING:
    import optuna
    from optuna.artifacts._protocol import ArtifactStore

    from kdsearch.service.storage import KdsearchStorage

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


# --- the location a study records -------------------------------------------------------


def check_location(location: ArtifactLocation) -> None:
    """Refuse a location that cannot hold a study's files, before it is recorded: a folder
    must be (or become) a writable folder, a bucket must answer."""
    if location.folder is not None:
        if location.folder.exists() and not location.folder.is_dir():
            raise InfrastructureError(
                f"artifact location {str(location)!r} is a file, not a folder; give a folder "
                f"(--artifacts or ${ARTIFACTS_ENV})"
            )
        try:
            require_writable(location.folder / "optuna")
        except OSError as exc:
            raise InfrastructureError(
                f"cannot use the artifact folder {str(location)!r}: {first_line(exc)}; give a "
                f"writable folder (--artifacts or ${ARTIFACTS_ENV})"
            ) from None
    else:
        S3Bucket(location)  # raises, naming the bucket, when it cannot be reached


def _recorded(storage: KdsearchStorage, study_id: int) -> str | None:
    from kdsearch.service.record import StudyAttr

    return storage.get_study_user_attrs(study_id).get(StudyAttr.ARTIFACTS)


def record_location(storage: KdsearchStorage, study_id: int, name: str, location: str) -> None:
    """Record ``location`` as the study's artifact location, unless it has another one.
    Callers hold the study's critical section."""
    from kdsearch.service.record import STUDY_KEYS, StudyAttr, check_keys

    recorded = _recorded(storage, study_id)
    if recorded is None:
        check_keys({StudyAttr.ARTIFACTS}, STUDY_KEYS)
        storage.set_study_user_attr(study_id, StudyAttr.ARTIFACTS, location)
        logger.info("study %s keeps its artifacts in %s", name, location)
    elif recorded != location:
        raise KdsearchError(
            f"artifact location {location!r} is not the one study {name!r} uses ({recorded!r}); "
            "drop --artifacts (and $KDSEARCH_ARTIFACTS) to use the study's, or move the study "
            f"with `kdsearch study relocate {name} --artifacts {location}`"
        )


def study_artifacts(
    storage: KdsearchStorage, name: str, explicit: str | None, worker: bool = False
) -> ArtifactLocation:
    """Where study ``name``'s artifacts are: ``explicit`` (``--artifacts`` or
    ``$KDSEARCH_ARTIFACTS``), else the location the study recorded, else the default.

    A ``worker`` naming another location than the one its study recorded is refused: one
    study's files never scatter over two places (readers may name another location: the
    files may have moved)."""
    from kdsearch.service.storage import require_study

    require_study(storage, name)
    study_id = storage.get_study_id_from_name(name)
    recorded = _recorded(storage, study_id)
    location = resolve_artifacts(explicit or recorded)
    if worker and recorded is not None and str(location) != recorded:
        record_location(storage, study_id, name, str(location))  # refuses, naming both
    return location


def record_study_location(storage: KdsearchStorage, name: str, location: ArtifactLocation) -> None:
    """Record where a study's worker keeps its artifacts (once it could open them), unless
    the study has a location already."""
    from kdsearch.service.storage import critical_section

    with critical_section(storage, name):
        record_location(storage, storage.get_study_id_from_name(name), name, str(location))


def relocate(storage: KdsearchStorage, name: str, new: str) -> str | None:
    """Record ``new`` as study ``name``'s artifact location (after checking it can hold
    files), returning the old one. The files themselves are the operator's to copy: the
    trials' artifact ids stay the same, so a copied folder or bucket serves them as is."""
    from kdsearch.service.record import StudyAttr
    from kdsearch.service.storage import critical_section, require_study

    require_study(storage, name)
    location = resolve_artifacts(new)
    check_location(location)
    study_id = storage.get_study_id_from_name(name)
    with critical_section(storage, name):
        old = _recorded(storage, study_id)
        storage.set_study_user_attr(study_id, StudyAttr.ARTIFACTS, str(location))
        # The teacher's prediction files are uploaded again, to the new place, by the next
        # worker (their record names the location they were uploaded to).
    return old


def recorded_locations(storage: optuna.storages.BaseStorage) -> dict[str, str | None]:
    """Each study's recorded artifact location (None where none is recorded)."""
    from kdsearch.service.record import StudyAttr

    return {s.study_name: s.user_attrs.get(StudyAttr.ARTIFACTS) for s in storage.get_all_studies()}


# --- a trial's files, all or nothing ----------------------------------------------------


def store_files(
    store: ArtifactStore, files: dict[str, Path], where: str
) -> dict[str, dict[str, Any]]:
    """Write ``files`` (by name) to the artifact store, each under a new artifact id;
    returns Optuna's artifact metadata by name. Nothing is registered here: the caller
    writes the metadata with the trial's outcome, in one transaction. If a write fails (a
    full disk, an unreachable bucket), what was written is removed again and
    ``InfrastructureError`` names the store: no truncated or unreferenced file is left."""
    import mimetypes

    written: list[str] = []
    metas: dict[str, dict[str, Any]] = {}
    try:
        for name, path in files.items():
            artifact_id = str(uuid.uuid4())
            written.append(artifact_id)
            with open(path, "rb") as handle:
                store.write(artifact_id, handle)
            fault_point("in-store")
            mimetype, encoding = mimetypes.guess_type(name)
            metas[name] = {
                "artifact_id": artifact_id,
                "filename": name,
                "mimetype": mimetype or "application/octet-stream",
                "encoding": encoding,
            }
    except Exception as exc:  # a read-only or full folder, an unreachable bucket
        remove_files(store, written)
        raise InfrastructureError(
            f"cannot write to the artifact store {where!r}: {first_line(exc)}. Make it "
            "writable (or give another --artifacts) and start the worker again"
        ) from None
    return metas


def remove_files(store: ArtifactStore, artifact_ids: list[str]) -> None:
    """Remove artifacts (best effort: what cannot be removed now is logged)."""
    for artifact_id in artifact_ids:
        try:
            store.remove(artifact_id)
        except Exception as exc:
            logger.warning("could not remove artifact %s: %s", artifact_id, first_line(exc))
