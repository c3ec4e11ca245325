"""``kdsearch augment``: TinyBERT's data augmentation (``data_augmentation.py``), as the
paper's authors used it for RTE, MRPC and CoLA, writing the file ``data.train_augmented``
reads.

For each input text, every word that is alphabetic and not a stop word gets up to M
candidates: a word that is one WordPiece is masked and the masked-language model's top M
predictions are taken (without ``##`` pieces); a word of several pieces gets its M nearest
GloVe neighbours (cosine; title-cased when the word is). Then N times: each candidate
word is replaced by a random one of its candidates with probability p; new sentences are
kept (the original first, no duplicates). For a pair task both texts are augmented in
turn, as the original does: the first text's variants are written with the original
second text, then the second text's variants with the *last* first-text variant. Up to
``N + 1`` rows per augmented text, so a pair task grows up to ``2 (N + 1)``-fold.

Where kdsearch differs from the original, deliberately:

- it is seeded (``--seed``; the original never seeds Python's ``random``): the same
  inputs, models and seed give the same file;
- it reads GloVe's first 100,000 words (as the original) but only as many as the file
  has (the original's matrix has 100,000 rows regardless, zero rows divide to NaN);
- it reads the study's train split through kdsearch's reader (any source) and writes a
  GLUE-style TSV with a header (``sentence`` or ``sentence1``/``sentence2``, ``label``),
  quoting off, as GLUE files are read;
- N defaults to TinyBERT's per-task value (30 for RTE, MRPC and CoLA), which the original
  applies even over its own ``--N``; here ``--n`` wins.
"""

from __future__ import annotations

import csv
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdsearch.service.errors import KdsearchError, first_line
from kdsearch.service.loading import load_spec
from kdsearch.workers.data import Split, load_task_data
from kdsearch.workers.models import load_tokenizer

logger = logging.getLogger(__name__)

# TinyBERT's data_augmentation.py, verbatim.
STOP_WORDS = frozenset([
    "i", "me", "my", "myself", "we", "our", "ours", "ourselves", "you", "you're", "you've",
    "you'll", "you'd", "your", "yours", "yourself", "yourselves", "he", "him", "his", "himself",
    "she", "she's", "her", "hers", "herself", "it", "it's", "its", "itself", "they", "them",
    "their", "theirs", "themselves", "this", "that", "that'll", "these", "those", "am", "is",
    "are", "was", "were", "be", "been", "being", "have", "has", "had", "having", "do", "does",
    "did", "doing", "a", "an", "the", "and", "but", "if", "or", "because", "as", "until", "while",
    "of", "at", "by", "for", "with", "about", "against", "between", "into", "through", "during",
    "before", "after", "above", "below", "to", "from", "up", "down", "in", "out", "on", "off",
    "over", "under", "again", "further", "then", "once", "here", "there", "all", "any", "both",
    "each", "few", "more", "most", "other", "some", "such", "no", "nor", "not", "only", "own",
    "same", "so", "than", "too", "very", "s", "t", "can", "will", "just", "don", "don't",
    "should", "should've", "now", "d", "ll", "m", "o", "re", "ve", "y", "ain", "aren", "aren't",
    "couldn", "couldn't", "didn", "didn't", "doesn", "doesn't", "hadn", "hadn't", "hasn",
    "hasn't", "haven", "haven't", "isn", "isn't", "ma", "mightn", "mightn't", "mustn",
    "mustn't", "needn", "needn't", "shan", "shan't", "shouldn", "shouldn't", "wasn", "wasn't",
    "weren", "weren't", "won", "won't", "wouldn", "wouldn't", "'s", "'re",
])  # fmt: skip
# N per task, TinyBERT's ``default_params``.
DEFAULT_N = {"cola": 30, "mrpc": 30, "rte": 30, "sst2": 20, "qnli": 20, "qqp": 10}
GLOVE_WORDS = 100_000
MAX_PIECES = 512  # BERT-base's positions (the original's limit); a smaller MLM's own


def is_valid(word: str) -> bool:
    """TinyBERT's ``_is_valid``: letters only."""
    return re.search("[^a-z]", word.lower()) is None


@dataclass(frozen=True)
class Glove:
    """GloVe vectors, normalised: the nearest neighbours of multi-piece words."""

    words: list[str]
    index: dict[str, int]
    vectors: np.ndarray  # (V, D), unit rows

    @classmethod
    def read(cls, path: Path, limit: int = GLOVE_WORDS) -> Glove:
        words, rows = [], []
        try:
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    items = line.rstrip().split(" ")
                    if len(items) < 2:
                        continue
                    words.append(items[0])
                    rows.append([float(x) for x in items[1:]])
                    if len(words) == limit:
                        break
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise KdsearchError(
                f"--glove {str(path)!r} cannot be read as GloVe vectors ({first_line(exc)}); give "
                "a text file of 'word v1 v2 ...' lines (glove.6B.300d.txt)"
            ) from None
        if not words or len({len(r) for r in rows}) != 1:
            raise KdsearchError(
                f"--glove {str(path)!r} holds no vectors of one size; give a GloVe file"
            )
        matrix = np.array(rows, dtype=np.float64)
        if "<unk>" in words:
            matrix[words.index("<unk>")] = 0.0  # as the original
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        return cls(
            words, {w: i for i, w in enumerate(words)}, matrix / np.where(norms == 0, 1, norms)
        )


class Augmentor:
    """TinyBERT's ``DataAugmentor``."""

    def __init__(
        self, mlm: torch.nn.Module, tokenizer: object, glove: Glove, settings: AugmentSettings
    ) -> None:
        from transformers.models.bert import BasicTokenizer

        self.mlm = mlm.eval()
        self.tokenizer = tokenizer
        lower = bool(getattr(tokenizer, "do_lower_case", True))
        self.basic = BasicTokenizer(do_lower_case=lower)
        self.glove = glove
        self.settings = settings
        self.rng = random.Random(settings.seed)
        positions = getattr(getattr(mlm, "config", None), "max_position_embeddings", MAX_PIECES)
        self.max_pieces = min(MAX_PIECES, int(positions))

    def _word_distance(self, word: str) -> list[str]:
        glove = self.glove
        if word not in glove.index:
            return []
        at = glove.index[word]
        distance = glove.vectors @ glove.vectors[at]
        distance[at] = -np.inf
        candidates = [
            glove.words[i] for i in np.argsort(-distance, kind="stable")[: self.settings.m]
        ]
        if word.istitle():
            candidates = [w.title() for w in candidates]
        return candidates

    @torch.inference_mode()
    def _masked_language_model(self, sentence: str, pieces: list[str], mask_at: int) -> list[str]:
        if mask_at >= self.max_pieces:
            return []
        tok = self.tokenizer
        original = ["[CLS]", *tok.tokenize(sentence)]  # type: ignore[attr-defined]
        length = len(original)
        text = [*pieces, "[SEP]", *original[1:], "[SEP]"]
        if len(text) > self.max_pieces:
            text = text[: self.max_pieces]
            length = min(length, self.max_pieces - 1)
        ids = torch.tensor([tok.convert_tokens_to_ids(text)])  # type: ignore[attr-defined]
        segments = torch.tensor([[0] * (length + 1) + [1] * (len(text) - length - 1)])
        device = next(self.mlm.parameters()).device
        logits = self.mlm(input_ids=ids.to(device), token_type_ids=segments.to(device)).logits
        top = torch.argsort(logits[0, mask_at].float(), descending=True, stable=True)[
            : self.settings.m
        ]
        words = tok.convert_ids_to_tokens(top.tolist())  # type: ignore[attr-defined]
        return [w for w in words if not w.startswith("##")]

    def _word_augment(self, sentence: str, word_index: int, word: str) -> list[str]:
        pieces = ["[CLS]", *self.tokenizer.tokenize(sentence)]  # type: ignore[attr-defined]
        at, positions = -1, []
        for i in range(1, len(pieces)):
            if "##" not in pieces[i]:
                at += 1
                if at < word_index:
                    positions = []
                elif at == word_index:
                    positions = [i]
                else:
                    break
            else:
                positions.append(i)
        candidates: list[str] = []
        if len(positions) == 1:
            pieces[positions[0]] = "[MASK]"
            candidates = self._masked_language_model(sentence, pieces, positions[0])
        elif len(positions) > 1:
            candidates = self._word_distance(word)
        return candidates or [word]

    def augment(self, sentence: str) -> list[str]:
        """The original sentence and up to N new ones."""
        out = [sentence]
        tokens = self.basic.tokenize(sentence)
        candidates = {
            i: self._word_augment(sentence, i, w)
            for i, w in enumerate(tokens)
            if is_valid(w) and w.lower() not in STOP_WORDS
        }
        for _ in range(self.settings.n):
            new = list(tokens)
            for i, words in candidates.items():
                choice = self.rng.choice(words)
                if self.rng.random() < self.settings.p:
                    new[i] = choice
            text = " ".join(new)
            if text not in out:
                out.append(text)
        return out


@dataclass(frozen=True)
class AugmentSettings:
    n: int = 30
    m: int = 15
    p: float = 0.4
    seed: int = 42


def augment_split(split: Split, augmentor: Augmentor) -> Split:
    """Every row's augmented rows, in order: the first text's variants (with the second
    text as it is), then, for a pair, the second text's variants with the last variant of
    the first (TinyBERT's ``read_augment_write``)."""
    a, b, labels = [], [] if split.text_b is not None else None, []
    for row, label in enumerate(split.labels):
        first = split.text_a[row]
        second = split.text_b[row] if split.text_b is not None else None
        for variant in augmentor.augment(first):
            first_now = variant
            a.append(variant)
            if b is not None:
                b.append(second or "")
            labels.append(label)
        if b is not None and second is not None:
            for variant in augmentor.augment(second):
                a.append(first_now)
                b.append(variant)
                labels.append(label)
        if (row + 1) % 100 == 0:
            logger.info("augmented %d of %d rows", row + 1, len(split))
    return Split(a, b, labels)


def write_tsv(path: Path, split: Split, header: list[str]) -> None:
    """A TSV with a header (quoting off, as GLUE files are read): the text column(s), then
    the label id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(
            handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None
        )
        writer.writerow(header)
        for i, label in enumerate(split.labels):
            texts = (
                [split.text_a[i]] if split.text_b is None else [split.text_a[i], split.text_b[i]]
            )
            writer.writerow([*(_clean(t) for t in texts), label])


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


@dataclass(frozen=True)
class AugmentRequest:
    spec: Path
    mlm: str
    glove: Path
    out: Path | None = None
    seed: int = 42
    n: int | None = None
    m: int = 15
    p: float = 0.4
    device: str = "cpu"


def augment_study(request: AugmentRequest) -> tuple[Path, int]:
    """Augment a study's train split; returns (the file written, its rows)."""
    from transformers import AutoModelForMaskedLM

    from kdsearch.workers.device import pick_device
    from kdsearch.workers.packages import resolve_model_ref

    spec = load_spec(request.spec)  # its train_augmented file need not exist yet
    out = request.out or (Path(spec.data.train_augmented) if spec.data.train_augmented else None)
    if out is None:
        raise KdsearchError(
            f"{request.spec}: data.train_augmented names no file to write; set it in the spec "
            "or pass --out"
        )
    data = load_task_data(spec.data.model_copy(update={"train_augmented": None}), spec.task)
    tokenizer = load_tokenizer(request.mlm)
    try:
        mlm = AutoModelForMaskedLM.from_pretrained(resolve_model_ref(request.mlm))
    except Exception as exc:
        raise KdsearchError(
            f"--mlm {request.mlm!r} is not a masked-language model ({first_line(exc)}); give a "
            "BERT folder or hub id such as bert-base-uncased"
        ) from None
    mlm.to(pick_device(request.device))
    settings = AugmentSettings(
        n=request.n or DEFAULT_N.get(spec.task, 30), m=request.m, p=request.p, seed=request.seed
    )
    augmentor = Augmentor(mlm, tokenizer, Glove.read(request.glove), settings)
    augmented = augment_split(data.train, augmentor)
    columns = spec.data.columns
    if columns is not None:  # the spec's own column names, which its reader expects
        header = [columns.text, *([columns.text_pair] if columns.text_pair else []), columns.label]
    else:  # GLUE's, which its TSV reader knows
        header = (
            ["sentence", "label"]
            if augmented.text_b is None
            else ["sentence1", "sentence2", "label"]
        )
    write_tsv(out, augmented, header)
    return out, len(augmented)
