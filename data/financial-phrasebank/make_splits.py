"""Splits excerpt.csv into train.csv and dev.csv (run once; both files are committed).

Rows whose text appears with two different labels are dropped (the source holds one such
pair), exact duplicates are kept once, and every 4th remaining row goes to dev, so both
splits keep the excerpt's mix of the three classes.

    python data/financial-phrasebank/make_splits.py
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    with (HERE / "excerpt.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = defaultdict(set)
    for row in rows:
        labels[row["Headline"]].add(row["Sentiment"])
    seen: set[str] = set()
    kept = []
    for row in rows:
        text = row["Headline"]
        if len(labels[text]) > 1 or text in seen:
            continue
        seen.add(text)
        kept.append(row)
    splits = {"train": [], "dev": []}
    for i, row in enumerate(kept):
        splits["dev" if i % 4 == 3 else "train"].append(row)
    for name, split in splits.items():
        with (HERE / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["Sentiment", "Headline"])
            writer.writeheader()
            writer.writerows(split)


if __name__ == "__main__":
    main()
