"""What a writer of the shared artifact store cannot do: run code on the workers, or write
outside their cache folder. And what a build leaves behind: the same bytes every time,
no half-built folders."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import boto3
import pytest
import torch

from kdsearch.service.artifacts import S3Bucket, resolve_artifacts
from kdsearch.service.errors import InfrastructureError, KdsearchError
from kdsearch.service.loading import load_spec
from kdsearch.service.spec import StudySpec
from kdsearch.workers.assets import prepare_assets
from kdsearch.workers.cache import AssetCache, write_manifest
from kdsearch.workers.stages import study_teacher
from tests.helpers import tiny_spec_text, write_spec

CPU = torch.device("cpu")


class Payload:
    """A pickle that runs a command when loaded: what an attacker would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _malicious(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


@pytest.fixture()
def spec(tmp_path: Path, tiny_bert_dir: Path, fixture_glue: Path) -> StudySpec:
    text = tiny_spec_text("trust", tiny_bert_dir, fixture_glue / "SST-2")
    return load_spec(write_spec(tmp_path / "t.yaml", text))


def test_a_planted_pickle_is_never_loaded(spec: StudySpec, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assets = prepare_assets(spec, AssetCache(cache), CPU)
    marker = tmp_path / "pwned"
    # 1. the arrays file replaced by a pickle, by someone who can write the cache (and so
    # its manifest too: the manifest catches damage, not a deliberate change)
    tensors = assets.folder / "assets.safetensors"
    original = tensors.read_bytes()
    tensors.write_bytes(_malicious(marker))
    write_manifest(assets.folder)
    with pytest.raises(InfrastructureError, match=r"cannot be read .* delete that folder"):
        prepare_assets(spec, AssetCache(cache), CPU)  # a new process
    tensors.write_bytes(original)
    # 2. the fine-tuned teacher's weights replaced by pickled "weights"
    teacher = assets.folder / "teacher"
    (teacher / "model.safetensors").unlink()
    (teacher / "pytorch_model.bin").write_bytes(_malicious(marker))
    with pytest.raises(KdsearchError, match="cannot load the teacher"):
        study_teacher(assets)
    # 3. even torch's own loader, as kdsearch calls it for checkpoints, refuses code
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(teacher / "pytorch_model.bin", weights_only=True)
    assert not marker.exists()  # nothing ran


def test_a_hostile_manifest_cannot_write_outside_the_cache(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    bucket_name = s3_env["KDSEARCH_TEST_BUCKET"]
    bucket = S3Bucket(resolve_artifacts(f"s3://{bucket_name}/p"))
    client = boto3.client("s3")
    outside = tmp_path / "outside"
    for name in ("../../outside", str(outside), "a/../../outside", "a//b", "..\\outside", ""):
        manifest = {
            "build": "0123456789ab",
            "host": "x",
            "files": {name: {"size": 1, "sha256": "0"}},
        }
        client.put_object(Bucket=bucket_name, Key="p/cache/evil/MANIFEST.json",
                          Body=json.dumps(manifest).encode())  # fmt: skip
        client.put_object(Bucket=bucket_name, Key=f"p/cache/evil/files-0123456789ab/{name}",
                          Body=b"x")  # fmt: skip
        dest = tmp_path / "cache" / "evil.tmp"
        dest.mkdir(parents=True, exist_ok=True)
        with pytest.raises(InfrastructureError, match="outside the cache folder"):
            bucket.fetch("evil", dest)
        assert not outside.exists() and list(dest.iterdir()) == []
    # A manifest that is not one at all is refused the same way.
    client.put_object(Bucket=bucket_name, Key="p/cache/evil/MANIFEST.json", Body=b"[1, 2]")
    with pytest.raises(InfrastructureError, match="is not a kdsearch manifest"):
        bucket.fetch("evil", tmp_path / "cache" / "evil.tmp")


def test_two_builds_of_the_same_assets_are_byte_identical(spec: StudySpec, tmp_path: Path) -> None:
    first = prepare_assets(spec, AssetCache(tmp_path / "a"), CPU)
    second = prepare_assets(spec, AssetCache(tmp_path / "b"), CPU)
    for name in ("assets.safetensors", "teacher/model.safetensors", "teacher_train.csv"):
        assert (first.folder / name).read_bytes() == (second.folder / name).read_bytes(), name


def test_a_failed_build_leaves_no_half_folder(tmp_path: Path) -> None:
    cache = AssetCache(tmp_path)
    # a leftover of a dead process is removed; a live one's is not touched
    (tmp_path / "x.tmp-999999999").mkdir()
    live = tmp_path / f"x.tmp-{os.getppid()}"
    live.mkdir()

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("written before the failure")
        raise RuntimeError("the build failed")

    with pytest.raises(RuntimeError, match="the build failed"):
        cache.folder("x", "x", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lock", live.name]
    folder = cache.folder("x", "x", lambda tmp: (tmp / "ok").write_text("ok"))
    assert (folder / "ok").read_text() == "ok"


@pytest.mark.parametrize("damage", ["teacher logits", "token ids", "the fine-tuned teacher"])
def test_a_damaged_cache_is_an_infrastructure_fault_naming_the_folder(
    spec: StudySpec, tmp_path: Path, damage: str
) -> None:
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    assets = prepare_assets(spec, AssetCache(cache), CPU)
    if damage == "the fine-tuned teacher":
        weights = assets.folder / "teacher" / "model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[-8:] = b"\x00" * 8  # same size, other bytes: a disk error
        weights.write_bytes(bytes(raw))
    else:
        path = assets.folder / "assets.safetensors"
        tensors = load_file(path)
        key = "teacher_logits.train" if damage == "teacher logits" else "train.input_ids"
        tensors[key] = tensors[key].flip(0).contiguous()  # still a valid file, other values
        save_file(tensors, path)
    with pytest.raises(InfrastructureError) as info:
        prepare_assets(spec, AssetCache(cache), CPU)  # a new process opens the folder
    message = str(info.value)
    assert info.value.exit_code == 4
    assert f"in {str(assets.folder)!r} are damaged" in message
    assert "does not match its SHA-256" in message and "Delete that folder" in message
