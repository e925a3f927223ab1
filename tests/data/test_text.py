"""Tests of the product text tokenizers and the flat token bags."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cartformer.data import text
from cartformer.data.text import (
    PAD_TOKEN,
    UNK_TOKEN,
    ProductTokenizer,
    load_pretrained,
    load_wordpiece,
    product_texts,
    tokenize_products,
    tokenize_texts,
    train_wordpiece,
)

PRODUCTS = pl.DataFrame(
    {
        "product_name": [
            "Молоко 3,2% «Северная ферма», 1 л",
            "Кефир 1,5% «Северная ферма», 930 мл",
            "Йогурт с клубникой «Зелёный луг», 350 г",
            "Хлеб на закваске «Колос», 400 г",
            "Батон с кунжутом «Колос», 300 г",
            "Молоко 3,2% «Северная ферма», 1 л",
        ],
        "product_category": [
            "Молочные продукты",
            "Молочные продукты",
            "Молочные продукты",
            "Хлеб и выпечка",
            "Хлеб и выпечка",
            "Молочные продукты",
        ],
    }
)


@pytest.fixture(scope="module")
def tokenizer() -> ProductTokenizer:
    return train_wordpiece(product_texts(PRODUCTS), vocab_size=300, min_frequency=1)


def test_special_token_ids(tokenizer: ProductTokenizer) -> None:
    assert tokenizer.backend.token_to_id(PAD_TOKEN) == 0
    assert tokenizer.unk_token_id == 1


def test_training_word_single_token(tokenizer: ProductTokenizer) -> None:
    assert tokenizer.tokens("Молоко") == ["Молоко"]


def test_mixed_case_cyrillic_known(tokenizer: ProductTokenizer) -> None:
    for word in ("МоЛоКо", "ЁЛКА", "йОГУРТ", "ЪыЬ", "QwErTy42"):
        tokens = tokenizer.tokens(word)
        assert tokens, word
        assert UNK_TOKEN not in tokens, word
        assert "".join(token.removeprefix("##") for token in tokens) == word


def test_case_preserved(tokenizer: ProductTokenizer) -> None:
    assert tokenizer.encode(["МОЛОКО"]) != tokenizer.encode(["молоко"])


def test_yo_and_short_i_kept(tokenizer: ProductTokenizer) -> None:
    assert "".join(tokenizer.tokens("Зелёный")).replace("##", "") == "Зелёный"
    assert "".join(tokenizer.tokens("Йогурт")).replace("##", "") == "Йогурт"


def test_unknown_symbol_is_unk(tokenizer: ProductTokenizer) -> None:
    assert tokenizer.tokens("☃") == [UNK_TOKEN]


def test_no_special_tokens_added(tokenizer: ProductTokenizer) -> None:
    ids = tokenizer.encode(["Молоко"])[0]
    assert len(ids) == 1


def test_bags_match_per_text_encoding(tokenizer: ProductTokenizer) -> None:
    names = PRODUCTS["product_name"]
    bags = tokenize_texts(tokenizer, names)
    assert len(bags) == len(names)
    assert bags.offsets[0] == 0
    assert bags.offsets[-1] == len(bags.token_ids)
    assert bags.token_ids.dtype == np.int64
    assert bags.offsets.dtype == np.int64
    for index, name in enumerate(names):
        assert bags.bag(index).tolist() == tokenizer.encode([name])[0], name


def test_repeated_texts_same_bag(tokenizer: ProductTokenizer) -> None:
    bags = tokenize_texts(tokenizer, PRODUCTS["product_name"])
    assert bags.bag(0).tolist() == bags.bag(5).tolist()


def test_null_text_empty_bag(tokenizer: ProductTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=text.__name__):
        bags = tokenize_texts(tokenizer, ["Молоко", None, "Хлеб"], name="product_name")
    assert bags.lengths.tolist()[1] == 0
    assert bags.lengths.tolist()[0] > 0
    assert "1 null product_name values" in caplog.text


def test_empty_input(tokenizer: ProductTokenizer) -> None:
    bags = tokenize_texts(tokenizer, [])
    assert len(bags) == 0
    assert bags.offsets.tolist() == [0]
    assert len(bags.token_ids) == 0


def test_products_share_category_tokens(tokenizer: ProductTokenizer) -> None:
    bags = tokenize_products(tokenizer, PRODUCTS)
    assert set(bags) == {"name", "category"}
    assert bags["category"].bag(0).tolist() == bags["category"].bag(1).tolist()
    assert bags["category"].bag(0).tolist() != bags["category"].bag(3).tolist()
    shared = set(bags["name"].bag(0).tolist()) & set(bags["name"].bag(1).tolist())
    assert tokenizer.backend.token_to_id("ферма") in shared


def test_missing_text_column_rejected(tokenizer: ProductTokenizer) -> None:
    with pytest.raises(ValueError, match="no column 'product_category'"):
        tokenize_products(tokenizer, PRODUCTS.drop("product_category"))


def test_product_texts_distinct() -> None:
    texts = product_texts(PRODUCTS)
    assert len(texts) == len(set(texts))
    assert "Хлеб и выпечка" in texts
    assert len(texts) == 5 + 2


def test_save_load_round_trip(tokenizer: ProductTokenizer, tmp_path: Path) -> None:
    tokenizer.save(tmp_path / "tokenizer")
    loaded = load_wordpiece(tmp_path / "tokenizer")
    names = PRODUCTS["product_name"].to_list() + ["МоЛоКо"]
    assert loaded.encode(names) == tokenizer.encode(names)
    assert loaded.vocab_size == tokenizer.vocab_size


def test_load_missing_dir_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        load_wordpiece(tmp_path)


def test_invalid_vocab_size_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece(["Молоко"], vocab_size=0)


def test_pretrained_local_dir(tokenizer: ProductTokenizer, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    tokenizer.save(tmp_path / "hf")
    loaded = load_pretrained(tmp_path / "hf")
    names = PRODUCTS["product_name"].to_list() + ["МоЛоКо"]
    assert loaded.source == str(tmp_path / "hf")
    assert loaded.encode(names) == tokenizer.encode(names)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.unk_token_id == tokenizer.unk_token_id
    bags = tokenize_texts(loaded, names)
    assert bags.bag(len(names) - 1).tolist() == tokenizer.encode(["МоЛоКо"])[0]


def test_pretrained_save_round_trip(tokenizer: ProductTokenizer, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    tokenizer.save(tmp_path / "hf")
    loaded = load_pretrained(tmp_path / "hf")
    loaded.save(tmp_path / "again")
    again = load_pretrained(tmp_path / "again")
    assert again.encode(["Кефир «Колос»"]) == tokenizer.encode(["Кефир «Колос»"])


def test_pretrained_bad_path_one_line(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="failed to load tokenizer") as error:
        load_pretrained(tmp_path / "empty")
    assert "\n" not in str(error.value)


def test_pretrained_without_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(ImportError, match=r"cartformer\[hf\]"):
        load_pretrained("DmitryPogrebnoy/distilbert-base-russian-cased")
