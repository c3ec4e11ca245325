"""``kdsearch augment``: TinyBERT's data augmentation on a tiny ``BertForMaskedLM`` (its own
WordPiece vocabulary) and a tiny GloVe file made here, against hand-checked outputs: which
position is masked, the GloVe neighbours of a multi-piece word, how many rows each input
gives for single and pair tasks, the pair task's pairing, and the seed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from kdsearch.workers.augment import (
    STOP_WORDS,
    Augmentor,
    AugmentRequest,
    AugmentSettings,
    Glove,
    augment_split,
    augment_study,
)
from kdsearch.workers.data import Split
from tests.helpers import kdsearch, tiny_spec_text, write_spec

pytestmark = pytest.mark.slow

WORDS = ["the", "film", "movie", "is", "good", "great", "fine", "bad", "a", "plot", "dull"]
PIECES = ["un", "##believ", "##able", "##s"]  # "unbelievable": three pieces
# 3-d vectors: "unbelievable"'s nearest are "incredible" (cos 0.99), then "amazing", "odd"
GLOVE = {
    "unbelievable": [1.0, 0.0, 0.0],
    "incredible": [0.99, 0.14, 0.0],
    "amazing": [0.9, 0.43, 0.0],
    "odd": [0.5, 0.0, 0.86],
    "film": [0.0, 1.0, 0.0],
    "<unk>": [0.3, 0.3, 0.3],
}


@pytest.fixture(scope="module")
def mlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mlm")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def glove(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("glove") / "glove.txt"
    path.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in GLOVE.items()))
    return path


def augmentor(mlm: Path, glove: Path, n: int = 8, m: int = 3, seed: int = 1) -> Augmentor:
    model = BertForMaskedLM.from_pretrained(mlm)
    tokenizer = BertTokenizerFast.from_pretrained(mlm)
    return Augmentor(model, tokenizer, Glove.read(glove), AugmentSettings(n, m, 0.4, seed))


def test_a_single_piece_word_is_masked_where_it_stands(mlm: Path, glove: Path) -> None:
    aug = augmentor(mlm, glove)
    # "the film is good": word 1 ("film") is piece 2 after [CLS]; the MLM sees
    # [CLS] the [MASK] is good [SEP] the film is good [SEP], segments 0 x 6 then 1 x 5.
    tokenizer = aug.tokenizer
    ids = tokenizer.convert_tokens_to_ids(
        ["[CLS]", "the", "[MASK]", "is", "good", "[SEP]", "the", "film", "is", "good", "[SEP]"]
    )
    with torch.no_grad():
        logits = aug.mlm(
            input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([[0] * 6 + [1] * 5])
        ).logits
    top = torch.argsort(logits[0, 2], descending=True, stable=True)[:3].tolist()
    expected = [w for w in tokenizer.convert_ids_to_tokens(top) if not w.startswith("##")]
    assert aug._word_augment("the film is good", 1, "film") == (expected or ["film"])


def test_a_multi_piece_word_takes_its_glove_neighbours(mlm: Path, glove: Path) -> None:
    aug = augmentor(mlm, glove)
    assert aug.tokenizer.tokenize("unbelievable") == ["un", "##believ", "##able"]
    # cosine to (1, 0, 0): incredible 0.990, amazing 0.902, odd 0.503, <unk> 0 (zeroed)
    assert aug._word_augment("an unbelievable plot", 1, "unbelievable") == [
        "incredible", "amazing", "odd",
    ]  # fmt: skip
    assert aug._word_distance("Unbelievable".lower()) == ["incredible", "amazing", "odd"]
    # several pieces but no GloVe vector: no candidate, the word itself
    assert aug._word_augment("unbelievables plot", 0, "unbelievables") == ["unbelievables"]


def test_variants_count_and_stop_words_stay(mlm: Path, glove: Path) -> None:
    aug = augmentor(mlm, glove, n=8)
    out = aug.augment("the film is good")
    assert out[0] == "the film is good" and 1 < len(out) <= 8 + 1
    assert len(set(out)) == len(out)  # no duplicates
    for variant in out:
        words = variant.split()
        assert (words[0], words[2]) == ("the", "is")  # stop words never change
    assert "the" in STOP_WORDS and "is" in STOP_WORDS
    assert aug.augment("the is a") == ["the is a"]  # nothing to replace: the original only


def test_a_pair_task_augments_both_texts_paired_as_tinybert_does(mlm: Path, glove: Path) -> None:
    aug = augmentor(mlm, glove, n=6)
    split = Split(["the film is good"], ["a dull plot"], [1])
    first = augmentor(mlm, glove, n=6).augment("the film is good")
    out = augment_split(split, aug)
    second = out.text_b[len(first) :]  # type: ignore[index]
    assert len(out) == len(first) + len(second) and len(second) >= 2
    assert out.text_a[: len(first)] == first and set(out.text_b[: len(first)]) == {"a dull plot"}  # type: ignore[index]
    # the second text's variants go with the *last* variant of the first
    assert set(out.text_a[len(first) :]) == {first[-1]} and second[0] == "a dull plot"
    assert out.labels == [1] * len(out)


def test_the_seed_makes_it_reproducible(mlm: Path, glove: Path) -> None:
    text = "the film is good a great plot"
    assert augmentor(mlm, glove, seed=3).augment(text) == augmentor(mlm, glove, seed=3).augment(
        text
    )
    runs = {tuple(augmentor(mlm, glove, seed=s).augment(text)) for s in range(5)}
    assert len(runs) > 1


def test_the_command_writes_the_file_the_spec_reads(
    tmp_path: Path, mlm: Path, glove: Path, tiny_bert_dir: Path, fixture_glue: Path
) -> None:
    text = tiny_spec_text("aug", tiny_bert_dir, fixture_glue / "RTE", extra="")
    text = text.replace("task: sst2", "task: rte").replace("train_limit: 160", "train_limit: 3")
    text = text.replace("  dev_limit: 64\n", "  dev_limit: 64\n  train_augmented: rte_aug.tsv\n")
    spec = write_spec(tmp_path / "aug.yaml", text)
    result = kdsearch("augment", str(spec), "--mlm", str(mlm), "--glove", str(glove),
                      "--n", "4", "--m", "3", "--seed", "7")  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = tmp_path / "rte_aug.tsv"
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == ["sentence1", "sentence2", "label"]
    # 3 pairs, each at most (4 + 1) + (4 + 1) rows, at least the two originals
    assert 3 * 2 <= len(rows) - 1 <= 3 * 10
    again = tmp_path / "again.tsv"
    augment_study(
        AugmentRequest(spec, str(mlm), glove, out=again, seed=7, n=4, m=3)
    )  # the same seed, the same file
    assert again.read_bytes() == out.read_bytes()
    # the study reads it: trained on the augmented rows, scored on the 3 originals
    created = kdsearch("study", "create", str(spec), "--storage", f"sqlite:///{tmp_path / 'k.db'}")
    assert created.returncode == 0, created.stderr
    labels = np.array([int(r[2]) for r in rows[1:]])
    assert set(labels) <= {0, 1}


def test_a_bad_glove_file_is_one_clear_message(tmp_path: Path, mlm: Path) -> None:
    bad = tmp_path / "glove.txt"
    bad.write_text("word 1.0 2.0\nother 1.0\n")
    from kdsearch.service.errors import KdsearchError

    with pytest.raises(KdsearchError, match="holds no vectors of one size"):
        Glove.read(bad)
