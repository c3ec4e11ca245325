"""What a machine that joins a study through S3 saves: building the study assets (teacher
fine-tuning, teacher logits, tokenised splits) against fetching the copy another machine
published, measured in the same run against the same bucket.

    AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
    .venv/bin/python bench/asset_sharing.py --s3 s3://BUCKET/PREFIX --storage postgresql+psycopg2://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import uuid
from pathlib import Path

import torch
from service_overhead import spec_dict  # this folder is on sys.path when run as a script

from kdsearch.service.artifacts import resolve_artifacts
from kdsearch.service.loading import spec_from_dict
from kdsearch.service.storage import open_storage
from kdsearch.workers.assets import prepare_assets
from kdsearch.workers.cache import open_asset_cache

logger = logging.getLogger("bench.assets")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--s3", required=True, metavar="s3://BUCKET/PREFIX")
    parser.add_argument("--storage", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)

    raw = spec_dict(f"bench-assets-{uuid.uuid4().hex[:8]}", 1, args.rows)
    raw["teacher"]["finetune"] = {"epochs": 1, "learning_rate": 5e-5, "batch_size": 32}
    spec = spec_from_dict(raw, source="bench")
    location = resolve_artifacts(f"{args.s3}/{spec.name}")
    storage = open_storage(args.storage)
    cpu = torch.device("cpu")
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for machine in ("builds", "fetches"):
            cache = open_asset_cache(location, Path(tmp) / machine, storage)
            start = time.perf_counter()
            assets = prepare_assets(spec, cache, cpu)
            timings[machine] = time.perf_counter() - start
        size = sum(p.stat().st_size for p in assets.folder.rglob("*") if p.is_file())
    build, fetch = timings["builds"], timings["fetches"]
    logger.info(
        "study assets (%d train rows, teacher fine-tuned 1 epoch, %.0f MB): built and "
        "published in %.1f s, fetched and verified in %.1f s (%.0fx faster)",
        args.rows, size / 1e6, build, fetch, build / fetch,
    )  # fmt: skip


if __name__ == "__main__":
    main()
