"""Dense indices for raw user, product and store ids, surfaces and cities, and their files.

Indices start at 1 and follow the sorted raw values, so the same input always gives the same
mapping. Index 0 (`UNKNOWN_INDEX`) stands for a value that the mapping has not seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

logger = logging.getLogger(__name__)

UNKNOWN_INDEX = 0
NO_SURFACE = "<none>"
INDEX_DTYPE = pl.Int32


@dataclass(frozen=True)
class _MappingKind:
    key_column: str
    key_dtype: pl.DataType
    null_value: str | None  # raw nulls are replaced by this value before lookup, if set


_KINDS: dict[str, _MappingKind] = {
    "user": _MappingKind("raw_id", pl.UInt64(), None),
    "product": _MappingKind("raw_id", pl.UInt64(), None),
    "source": _MappingKind("value", pl.String(), NO_SURFACE),
    # Side features: a null city or store maps to UNKNOWN_INDEX like an unseen one.
    "city": _MappingKind("value", pl.String(), None),
    "store": _MappingKind("raw_id", pl.UInt64(), None),
}


class IdMapping:
    """Bijection between the distinct raw values of one column and indices 1..n.

    `name` is one of "user", "product", "store" (u64 `raw_id` keys), "source" or "city" (str
    `value` keys). A null surface is the value `NO_SURFACE`, while a null city or store is left
    out of the mapping and encodes to `UNKNOWN_INDEX`. The mapping is stored as a two-column
    table (key, `index` i32) sorted by key, so index i belongs to the i-th smallest raw value.
    """

    def __init__(self, name: str, keys: pl.Series) -> None:
        """Build the mapping for `keys`, which must be sorted, unique and free of nulls."""
        kind = _kind(name)
        keys = keys.cast(kind.key_dtype).rename(kind.key_column)
        if keys.null_count() or keys.n_unique() != len(keys) or not keys.is_sorted():
            raise ValueError(
                f"{name} mapping keys must be sorted, unique and non-null; use IdMapping.fit"
            )
        self.name = name
        self.key_column = kind.key_column
        self._kind = kind
        indices = pl.int_range(1, len(keys) + 1, dtype=INDEX_DTYPE, eager=True).alias("index")
        self.table = pl.DataFrame([keys, indices])

    @classmethod
    def fit(cls, name: str, values: pl.Series) -> IdMapping:
        """Map the distinct values of `values` (any length, nulls allowed) to 1..n."""
        kind = _kind(name)
        keys = _prepare_keys(values, kind)
        if kind.null_value is None:
            keys = keys.drop_nulls()
        return cls(name, keys.unique().sort())

    def __len__(self) -> int:
        return self.table.height

    @property
    def vocab_size(self) -> int:
        """Number of indices including the reserved `UNKNOWN_INDEX`: len(self) + 1."""
        return len(self) + 1

    @property
    def keys(self) -> pl.Series:
        return self.table[self.key_column]

    def encode_expr(self, column: str | pl.Expr) -> pl.Expr:
        """Return an Int32 expression mapping a raw column to indices, 0 for unseen or null ids.

        The lookup is a hash join inside polars (`replace_strict`), so it runs lazily and
        without Python code per row.
        """
        expr = pl.col(column) if isinstance(column, str) else column
        keys = _prepare_expr(expr, self._kind)
        return keys.replace_strict(
            old=self.keys,
            new=self.table["index"],
            default=UNKNOWN_INDEX,
            return_dtype=INDEX_DTYPE,
        )

    def encode(self, values: pl.Series) -> pl.Series:
        """Map raw values of shape (n,) to Int32 indices of shape (n,), logging unseen values."""
        _check_key_dtype(values, self._kind)
        frame = pl.DataFrame({"raw": values})
        encoded = frame.select(self.encode_expr("raw").alias(values.name))[values.name]
        unseen = int((encoded == UNKNOWN_INDEX).sum())
        if unseen:
            logger.info(
                "%d of %d %s values are null or unseen and map to index %d",
                unseen,
                len(values),
                self.name,
                UNKNOWN_INDEX,
            )
        return encoded

    def decode(self, indices: pl.Series | np.ndarray) -> pl.Series:
        """Map indices of shape (n,) back to raw values; `UNKNOWN_INDEX` becomes null.

        Raises ValueError on an index outside 0..len(self).
        """
        array = np.asarray(indices.to_numpy() if isinstance(indices, pl.Series) else indices)
        array = array.astype(np.int64, copy=False)
        bad = (array < 0) | (array > len(self))
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} {self.name} indices are outside 0..{len(self)} "
                f"(e.g. {array[bad][:3].tolist()}); decode only indices produced by this mapping"
            )
        with_unknown = pl.concat([pl.Series([None], dtype=self.keys.dtype), self.keys])
        return with_unknown.gather(array).rename(self.key_column)

    def save(self, directory: str | Path) -> Path:
        """Write the table to `directory/<name>.parquet` and return that path."""
        path = Path(directory) / f"{self.name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table.write_parquet(path)
        return path

    @classmethod
    def load(cls, directory: str | Path, name: str) -> IdMapping:
        """Read `directory/<name>.parquet` written by `save` and check that it is intact."""
        kind = _kind(name)
        path = Path(directory) / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"mapping file {path} not found; run the prepare stage first")
        table = pl.read_parquet(path)
        if table.columns != [kind.key_column, "index"]:
            raise ValueError(
                f"mapping file {path} has columns {table.columns}, expected "
                f"{[kind.key_column, 'index']}; rerun the prepare stage"
            )
        mapping = cls(name, table[kind.key_column])
        if not mapping.table["index"].equals(table["index"].cast(INDEX_DTYPE)):
            raise ValueError(
                f"mapping file {path} does not number its sorted keys 1..{len(table)}; "
                f"rerun the prepare stage"
            )
        return mapping


def _kind(name: str) -> _MappingKind:
    if name not in _KINDS:
        raise ValueError(f"unknown mapping name {name!r}; expected one of {list(_KINDS)}")
    return _KINDS[name]


def _prepare_keys(values: pl.Series, kind: _MappingKind) -> pl.Series:
    _check_key_dtype(values, kind)
    return pl.select(_prepare_expr(pl.lit(values), kind)).to_series()


def _check_key_dtype(values: pl.Series, kind: _MappingKind) -> None:
    if kind.key_dtype == pl.String or values.dtype.is_integer() or values.dtype == pl.Null:
        return
    raise ValueError(
        f"{kind.key_column} values have dtype {values.dtype}, expected an integer type; "
        f"cast the id column to an integer type before encoding"
    )


def _prepare_expr(expr: pl.Expr, kind: _MappingKind) -> pl.Expr:
    """Cast raw values to the key dtype, replacing nulls by the kind's null value if it has one.

    The cast is strict, so a negative id or a non-numeric string id raises instead of being
    silently mapped to the unknown index.
    """
    if kind.key_dtype == pl.String:
        expr = expr.cast(pl.String)
    else:
        expr = expr.cast(kind.key_dtype, strict=True)
    if kind.null_value is not None:
        expr = expr.fill_null(kind.null_value)
    return expr
