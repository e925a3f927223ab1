"""Tokenizers for the product texts (`product_name`, `product_category`) and flat token bags.

Two sources of tokenizers:

- `train_wordpiece` trains a WordPiece tokenizer with the `tokenizers` library on product texts.
  `ProductTokenizer.save` writes it as `tokenizer.json` plus `tokenizer_config.json`, the
  layout that `transformers.AutoTokenizer.from_pretrained` reads, and `load_wordpiece` reads it
  back without `transformers`.
- `load_pretrained` loads any Hugging Face tokenizer by hub name or local directory through
  `transformers` (the optional extra `cartformer[hf]`), e.g. the cased Russian DistilBERT
  tokenizer `DmitryPogrebnoy/distilbert-base-russian-cased`.

Case is preserved. The trained tokenizer applies only NFC normalization and Unicode cleanup
(no lowercasing, no accent stripping), because case carries information in names such as
brands and because stripping accents would turn «й» into «и» and «ё» into «е». Every Cyrillic
and Latin letter and every digit is in its vocabulary both as a word start and as a `##`
continuation piece, so a word made of those characters is never mapped to `[UNK]`, whatever its
mix of cases.

`tokenize_texts` turns N texts into one bag of token ids per text: a flat (T,) int64 array and
(N + 1,) int64 offsets, so the tokens of text i are `token_ids[offsets[i]:offsets[i + 1]]`.
This is the input layout of `torch.nn.EmbeddingBag` and of `cartformer.model.features`.
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
UNK_TOKEN = "[UNK]"
PAD_TOKEN = "[PAD]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN)
"""Special tokens of the trained tokenizer: [PAD] has id 0 and [UNK] id 1."""
CONTINUATION_PREFIX = "##"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MIN_FREQUENCY = 2

BASE_ALPHABET = (
    "АБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "abcdefghijklmnopqrstuvwxyz"
    "0123456789"
)
"""Characters that the trained tokenizer covers as word starts and as continuations."""

TEXT_COLUMNS: dict[str, str] = {"name": "product_name", "category": "product_category"}
"""Text field name -> input column. Both fields share one token embedding table in the model."""

HF_EXTRA_HINT = "Install it with `pip install 'cartformer[hf]'` (or `pip install transformers`)"


@dataclass(frozen=True)
class TokenBags:
    """One bag of token ids per text, flattened.

    token_ids: (T,) int64, the tokens of all texts in text order.
    offsets: (N + 1,) int64, offsets[0] == 0 and offsets[-1] == T; text i has the tokens
        token_ids[offsets[i]:offsets[i + 1]]. An empty text has an empty bag.
    """

    token_ids: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int64 number of tokens of each text."""
        return np.diff(self.offsets)

    def bag(self, index: int) -> np.ndarray:
        """Return the (L,) token ids of text `index`."""
        return self.token_ids[self.offsets[index] : self.offsets[index + 1]]


class ProductTokenizer:
    """A tokenizer of product texts: a WordPiece one trained here or a Hugging Face one.

    Args:
        backend: a `tokenizers.Tokenizer` or a `transformers` tokenizer (anything with
            `__call__(texts, add_special_tokens=False)` returning `input_ids`).
        source: "wordpiece" for a tokenizer trained by `train_wordpiece`, otherwise the name or
            path that `load_pretrained` received.
    """

    def __init__(self, backend: Any, source: str) -> None:
        self.backend = backend
        self.source = source
        self._is_wordpiece = isinstance(backend, Tokenizer)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included: the row count of an embedding table."""
        if self._is_wordpiece:
            return int(self.backend.get_vocab_size(with_added_tokens=True))
        return len(self.backend)

    @property
    def unk_token_id(self) -> int | None:
        """Id of the unknown token, or None if the tokenizer has none."""
        if self._is_wordpiece:
            return self.backend.token_to_id(UNK_TOKEN)
        return self.backend.unk_token_id

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each of the N texts, without special tokens such as [CLS]."""
        texts = list(texts)
        if not texts:
            return []
        if self._is_wordpiece:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            return list(map(operator.attrgetter("ids"), encodings))
        return self.backend(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    def tokens(self, text: str) -> list[str]:
        """Return the token strings of one text, for inspection and tests."""
        ids = self.encode([text])[0]
        if self._is_wordpiece:
            return [self.backend.id_to_token(token_id) for token_id in ids]
        return self.backend.convert_ids_to_tokens(ids)

    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer into `directory` (created if missing) and return the directory.

        A trained WordPiece tokenizer is written as `tokenizer.json` and `tokenizer_config.json`,
        which both `load_wordpiece` and `load_pretrained` read. A Hugging Face tokenizer is
        written by its own `save_pretrained`.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if not self._is_wordpiece:
            self.backend.save_pretrained(str(path))
            return path
        self.backend.save(str(path / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": UNK_TOKEN,
            "pad_token": PAD_TOKEN,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 512,
        }
        (path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return path


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
) -> ProductTokenizer:
    """Train a cased WordPiece tokenizer on product texts.

    Args:
        texts: training texts, e.g. the names and categories of the products seen in the
            training period. Nulls are not allowed.
        vocab_size: target vocabulary size, special tokens included. The alphabet coverage
            (BASE_ALPHABET plus every character of `texts`, each as a start and a `##`
            continuation) is added on top, so the result can be a little larger.
        min_frequency: minimum count of a merged piece in `texts`.

    Raises:
        ValueError: if `vocab_size` or `min_frequency` is below 1.
    """
    if vocab_size < 1 or min_frequency < 1:
        raise ValueError(
            f"vocab_size ({vocab_size}) and min_frequency ({min_frequency}) must be at least 1"
        )
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
            ),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(BASE_ALPHABET),
        continuing_subword_prefix=CONTINUATION_PREFIX,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    _cover_alphabet(tokenizer)
    logger.info("trained a WordPiece tokenizer with %d tokens", tokenizer.get_vocab_size())
    return ProductTokenizer(tokenizer, "wordpiece")


def _cover_alphabet(tokenizer: Tokenizer) -> None:
    """Add every single character of the vocabulary and BASE_ALPHABET as a `##` piece, and back.

    The trainer only adds a continuation piece for a character that it saw inside a word, so
    without this an upper-case letter in the middle of a word (brand spellings) would turn the
    whole word into [UNK].
    """
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    prefix = CONTINUATION_PREFIX
    characters = set(BASE_ALPHABET)
    for token in vocab:
        piece = token[len(prefix) :] if token.startswith(prefix) else token
        if len(piece) == 1:
            characters.add(piece)
    missing = sorted(
        {character for character in characters if character not in vocab}
        | {prefix + character for character in characters if prefix + character not in vocab}
    )
    if not missing:
        return
    extended = dict(vocab)
    for token in missing:
        extended[token] = len(extended)
    tokenizer.model = models.WordPiece(
        extended, unk_token=UNK_TOKEN, continuing_subword_prefix=prefix
    )


def load_wordpiece(directory: str | Path) -> ProductTokenizer:
    """Load a tokenizer saved by `ProductTokenizer.save` from its `tokenizer.json`.

    Raises:
        FileNotFoundError: if `directory` has no tokenizer.json.
    """
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} not found. Train one with train_wordpiece and save it there"
        )
    return ProductTokenizer(Tokenizer.from_file(str(path)), "wordpiece")


def load_pretrained(name_or_path: str | Path) -> ProductTokenizer:
    """Load a Hugging Face tokenizer with `transformers.AutoTokenizer.from_pretrained`.

    `name_or_path` is a hub model name, which needs access to the Hugging Face hub, or a local
    directory with the tokenizer files.

    Raises:
        ImportError: if `transformers` is not installed.
        ValueError: if the tokenizer cannot be loaded from `name_or_path`.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise ImportError(
            f"loading tokenizer {str(name_or_path)!r} needs the transformers package. "
            f"{HF_EXTRA_HINT}, or drop the tokenizer name to train a WordPiece tokenizer"
        ) from error
    try:
        backend = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ValueError(
            f"failed to load tokenizer {str(name_or_path)!r}: {first_line}. Pass a local "
            "directory with tokenizer files or a hub name that this machine can download"
        ) from error
    return ProductTokenizer(backend, str(name_or_path))


def tokenize_texts(
    tokenizer: ProductTokenizer,
    texts: Sequence[str | None] | pl.Series | np.ndarray,
    name: str = "text",
) -> TokenBags:
    """Tokenize N texts into flat token bags.

    Each distinct text is tokenized once through the tokenizer's batch API, and the bags are
    then expanded to all N texts with numpy. Null texts get an empty bag, and their count is
    logged with `name` (the column name, e.g. "product_name"). Texts that contain the unknown
    token are counted in the log too.

    Returns:
        TokenBags with (T,) int64 token ids and (N + 1,) int64 offsets.
    """
    series = pl.Series(name, texts, dtype=pl.String)
    nulls = series.null_count()
    if nulls:
        logger.warning("%d null %s values get an empty token bag", nulls, name)
        series = series.fill_null("")

    distinct = series.unique(maintain_order=True)
    code = (
        series.to_frame("text")
        .join(
            distinct.to_frame("text").with_row_index("code"),
            on="text",
            how="left",
            maintain_order="left",
        )["code"]
        .to_numpy()
        .astype(np.int64)
    )
    distinct_bags = _flatten(tokenizer.encode(distinct.to_list()))

    unk = tokenizer.unk_token_id
    if unk is not None and len(distinct_bags.token_ids):
        has_unk = np.zeros(len(distinct_bags), dtype=bool)
        owner = np.repeat(np.arange(len(distinct_bags)), distinct_bags.lengths)
        has_unk[owner[distinct_bags.token_ids == unk]] = True
        texts_with_unk = int(has_unk[code].sum())
        if texts_with_unk:
            logger.info(
                "%d of %d %s values contain an unknown token", texts_with_unk, len(code), name
            )
    return _expand(distinct_bags, code)


def check_text_columns(columns: Sequence[str]) -> None:
    """Raise ValueError naming the first text column of TEXT_COLUMNS missing from `columns`."""
    missing = [column for column in TEXT_COLUMNS.values() if column not in columns]
    if missing:
        raise ValueError(
            f"input has no column {missing[0]!r}, but text features need "
            f"{sorted(TEXT_COLUMNS.values())}. Turn them off for this file"
        )


def tokenize_products(tokenizer: ProductTokenizer, products: pl.DataFrame) -> dict[str, TokenBags]:
    """Tokenize the text columns of a product table, one row per product.

    Args:
        products: a frame with the columns of TEXT_COLUMNS (product_name, product_category),
            one row per product in the order of the bags to build (e.g. by product index).

    Returns:
        Text field name ("name", "category") -> TokenBags with one bag per row of `products`.

    Raises:
        ValueError: if a text column is missing.
    """
    check_text_columns(products.columns)
    return {
        field: tokenize_texts(tokenizer, products[column], name=column)
        for field, column in TEXT_COLUMNS.items()
    }


def product_texts(products: pl.DataFrame) -> list[str]:
    """Return the distinct non-null names and categories of `products`, to train a tokenizer on.

    Raises:
        ValueError: if a text column is missing.
    """
    check_text_columns(products.columns)
    values = [products[column].drop_nulls().unique() for column in TEXT_COLUMNS.values()]
    return pl.concat(values).unique(maintain_order=True).sort().to_list()


def _flatten(ids: list[list[int]]) -> TokenBags:
    """Concatenate per-text token id lists into TokenBags."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    token_ids = np.fromiter(
        itertools.chain.from_iterable(ids), dtype=np.int64, count=int(offsets[-1])
    )
    return TokenBags(token_ids=token_ids, offsets=offsets)


def _expand(bags: TokenBags, code: np.ndarray) -> TokenBags:
    """Return the bags `bags[code[i]]` for each of the N entries of `code`, flattened."""
    lengths = bags.lengths[code]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Position j of the output belongs to text i = owner[j] and reads the source bag of code[i]
    # at the same distance from its start.
    source_start = bags.offsets[:-1][code]
    gather = np.arange(offsets[-1], dtype=np.int64) + np.repeat(
        source_start - offsets[:-1], lengths
    )
    return TokenBags(token_ids=bags.token_ids[gather], offsets=offsets)
