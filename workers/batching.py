"""Tokenised splits and their batches: dynamic padding and length-grouped shuffles, or
TinyBERT's padded, uniform batches.

Rows stay unpadded in memory (``Encoded``); each batch is padded to its own longest row
(``collate``), and training batches group rows of similar length (``length_grouped_batches``)
so little compute goes to padding. ``Batching`` also describes TinyBERT's way: every
batch padded to max_seq_length (the padded positions are part of stage 1's MSE),
uniformly shuffled rows (``RandomSampler``), and the last, smaller batch of an epoch
skipped.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from kdsearch.workers.data import Split


@dataclass(frozen=True)
class Encoded:
    """A tokenised split: unpadded token ids (padding happens per batch)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor  # (N,) int64
    pad_id: int = 0  # the tokenizer's padding token

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, index: list[int]) -> Encoded:
        return Encoded(
            [self.input_ids[i] for i in index],
            None if self.token_type_ids is None else [self.token_type_ids[i] for i in index],
            self.labels[index],
            self.pad_id,
        )

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors (ragged rows as values + offsets): plain arrays,
        so a shared cache never holds anything executable."""
        out = {f"{prefix}.labels": self.labels.contiguous()}
        columns = {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids}
        offsets = torch.tensor([0, *self.lengths], dtype=torch.int64).cumsum(0)
        out[f"{prefix}.offsets"] = offsets
        for name, rows in columns.items():
            if rows is not None:
                flat = [token for row in rows for token in row]
                out[f"{prefix}.{name}"] = torch.tensor(flat, dtype=torch.int32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, pad_id: int) -> Encoded:
        offsets = tensors[f"{prefix}.offsets"].tolist()

        def rows(name: str) -> list[list[int]] | None:
            flat = tensors.get(f"{prefix}.{name}")
            if flat is None:
                return None
            values = flat.tolist()
            return [values[a:b] for a, b in itertools.pairwise(offsets)]

        input_ids = rows("input_ids")
        assert input_ids is not None, f"{prefix}.input_ids missing"
        return cls(input_ids, rows("token_type_ids"), tensors[f"{prefix}.labels"].long(), pad_id)


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def encode(tokenizer: PreTrainedTokenizerBase, split: Split, max_seq_length: int) -> Encoded:
    enc = tokenizer(
        split.text_a,
        split.text_b,
        truncation=True,
        max_length=max_seq_length,
        padding=False,
    )
    return Encoded(
        input_ids=enc["input_ids"],
        token_type_ids=enc.get("token_type_ids"),
        labels=torch.tensor(split.labels, dtype=torch.long),
        pad_id=pad_id_of(tokenizer),
    )


def collate(data: Encoded, index: list[int], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad the rows in ``index`` to their longest (dynamic padding), or to ``pad_to``
    (TinyBERT's max_seq_length): (B, L) tensors."""
    length = max(len(data.input_ids[i]) for i in index)
    if pad_to is not None:
        length = max(length, pad_to)
    ids = torch.full((len(index), length), data.pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), length), dtype=torch.long)
    types = torch.zeros((len(index), length), dtype=torch.long)
    for row, i in enumerate(index):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        mask[row, :n] = 1
        if data.token_type_ids is not None:
            types[row, :n] = torch.tensor(data.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask}
    if data.token_type_ids is not None:
        batch["token_type_ids"] = types
    return batch


def length_grouped_batches(
    lengths: list[int], batch_size: int, generator: torch.Generator, group: int = 50
) -> list[list[int]]:
    """Shuffled batches of similar-length rows: less padding, still random.

    Shuffle, cut into chunks of ``group`` batches, sort each chunk by length, split it
    into batches, then shuffle the batch order. Depends on the generator only.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * group
    batches = []
    for start in range(0, len(order), chunk):
        rows = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def uniform_batches(
    n_rows: int, batch_size: int, generator: torch.Generator, drop_last: bool
) -> list[list[int]]:
    """Uniformly shuffled batches, as ``DataLoader(sampler=RandomSampler(data,
    generator=generator))`` draws them (one ``randperm`` per epoch); with ``drop_last``,
    without the last, smaller batch (TinyBERT skips it)."""
    order = torch.randperm(n_rows, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def dataloader_batches(n_rows: int, batch_size: int, drop_last: bool) -> list[list[int]]:
    """One epoch's batches exactly as ``DataLoader(data, sampler=RandomSampler(data),
    batch_size)`` draws them from the global generator (TinyBERT's loader): the loader's
    iterator first draws its base seed, the sampler then draws the seed of its own
    generator, and the order is that generator's ``randperm``. Both draws advance the
    global generator, which the dropout masks share, so the masks after them are
    TinyBERT's too (``tests/test_paper_exact.py`` checks it against a real DataLoader)."""
    torch.empty((), dtype=torch.int64).random_()  # _BaseDataLoaderIter's base seed
    seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()  # TinyBERT skips it inside the loop, after the draws
    return batches


def consume_dataloader_draw() -> None:
    """The global-generator draw a ``DataLoader`` iterator makes when it starts (its base
    seed): TinyBERT's dev evaluation makes one at every evaluation, between training
    steps, so an exact replay makes it too."""
    torch.empty((), dtype=torch.int64).random_()


@dataclass(frozen=True)
class Batching:
    """How a stage's training batches are made."""

    order: Literal["length_grouped", "uniform", "dataloader"] = "length_grouped"
    pad_to: int | None = None  # None: each batch padded to its longest row
    drop_last: bool = False  # skip the last, smaller batch of an epoch (TinyBERT)

    def batches(
        self, data: Encoded, batch_size: int, generator: torch.Generator
    ) -> list[list[int]]:
        if self.order == "uniform":
            return uniform_batches(len(data), batch_size, generator, self.drop_last)
        if self.order == "dataloader":
            return dataloader_batches(len(data), batch_size, self.drop_last)
        batches = length_grouped_batches(data.lengths, batch_size, generator)
        if self.drop_last:
            batches = [b for b in batches if len(b) == batch_size]
        return batches

    def steps_per_epoch(self, n_rows: int, batch_size: int) -> int:
        if self.drop_last:
            return n_rows // batch_size
        return math.ceil(n_rows / batch_size)
