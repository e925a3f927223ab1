"""Side-feature building blocks: a DCN cross layer, token bags, categorical and time encoders.

All blocks work on the unpadded batch layout of cartformer: N events of B sequences
concatenated along dim 0, with `lengths` (B,) giving each sequence's event count. Every block
returns float tensors of shape (N, D) or (N, F, D) for F fields.

- `CrossLayer` and `CrossNetwork`: DCN-v2 feature crossing, x_{l+1} = x_0 * (W x_l + b) + x_l.
- `FeatureCross`: concatenates F field vectors (N, D) each, crosses them and projects back to D.
- `TokenBagEncoder`: sum of token embeddings per text, one table shared by all text fields.
- `ProductTextEncoder`: the token bags of every product as buffers, looked up by product index.
- `CategoricalEmbeddings`: one table per categorical field, index 0 for unseen values.
- `calendar_features`, `time_gap_buckets` and `TimeEncoder`: hour of day, weekday, month and
  the log-bucketed gap to the previous event.

Time zone: timestamps are unix seconds (UTC). Calendar features use a fixed offset from UTC in
hours, `utc_offset_hours`, by default +3 (Moscow time, which has no daylight saving time since
2014). A fixed offset keeps the computation a few integer tensor ops, but it cannot follow
daylight-saving changes of other zones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

DAY_SECONDS = 24 * 60 * 60
HOUR_SECONDS = 60 * 60
MOSCOW_UTC_OFFSET_HOURS = 3.0
"""Default offset of the calendar features: Moscow time, UTC+3 all year."""

NUM_HOURS = 24
NUM_WEEKDAYS = 7
NUM_MONTHS = 12

FIRST_EVENT_BUCKET = 0
"""Gap bucket of the first event of each sequence, which has no previous event."""
LOG_GAP_BUCKET_WIDTH = 0.301
"""Width of one gap bucket in natural-log seconds, as in the HSTU reference code
(generative-recommenders): consecutive bucket edges differ by a factor e^0.301 ~ 1.35."""
DEFAULT_GAP_BUCKETS = 64
"""Bucket 0 for first events and 63 log buckets. The last one starts at e^(62 * 0.301) s, about
4 years, so every gap inside the demo's 13 months has its own bucket."""


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: x_{l+1} = x_0 * (W x_l + b) + x_l, with * elementwise.

    Args:
        dim: input and output size D.

    `forward(x0, x)` takes x_0 and x_l of shape (..., D) and returns x_{l+1} of shape (..., D).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.linear(x) + x


class CrossNetwork(nn.Module):
    """A stack of `num_layers` CrossLayers that all cross with the same input x_0.

    `forward(x0)` maps (..., D) to (..., D). With `num_layers` = 0 it returns x_0 unchanged.
    """

    def __init__(self, dim: int, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers is {num_layers}. Use 0 or more cross layers")
        self.layers = nn.ModuleList(CrossLayer(dim) for _ in range(num_layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class FeatureCross(nn.Module):
    """Combine F field vectors into one: concatenate, cross, then project to D.

    Args:
        num_fields: F, the number of (N, D) inputs.
        dim: D, the size of each input and of the output.
        num_layers: cross layers applied to the concatenated (N, F * D) vector.

    `forward(fields)` takes a sequence of F tensors of shape (N, D) and returns (N, D). One field
    with no cross layer is returned as is, so an id-only item encoder keeps its plain embedding.
    """

    def __init__(self, num_fields: int, dim: int, num_layers: int = 2) -> None:
        super().__init__()
        if num_fields < 1:
            raise ValueError(
                f"num_fields is {num_fields}, but a feature cross needs at least one field"
            )
        self.num_fields = num_fields
        self.cross = CrossNetwork(num_fields * dim, num_layers)
        self.identity = num_fields == 1 and num_layers == 0
        self.projection = None if self.identity else nn.Linear(num_fields * dim, dim)

    def forward(self, fields: Sequence[Tensor]) -> Tensor:
        if len(fields) != self.num_fields:
            raise ValueError(
                f"FeatureCross got {len(fields)} fields but was built for {self.num_fields}"
            )
        if self.identity:
            return fields[0]
        crossed = self.cross(torch.cat(list(fields), dim=-1))
        assert self.projection is not None
        return self.projection(crossed)


class TokenBagEncoder(nn.Module):
    """Sum of token embeddings per text (bag of words), from flat token ids and offsets.

    Args:
        vocab_size: number of token ids of the tokenizer (`ProductTokenizer.vocab_size`).
        dim: embedding size D.

    One table serves every text field, so a token has the same vector in a product name and in
    a category name. `forward(token_ids, offsets)` takes (T,) int64 token ids and (N + 1,) int64
    offsets (text i has tokens token_ids[offsets[i]:offsets[i + 1]]) and returns (N, D). An
    empty text gives a zero vector.
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(
                f"token vocab_size is {vocab_size}. Set it from the tokenizer's vocab_size"
            )
        self.embedding = nn.EmbeddingBag(vocab_size, dim, mode="sum", include_last_offset=True)
        nn.init.normal_(self.embedding.weight, std=dim**-0.5)

    def forward(self, token_ids: Tensor, offsets: Tensor) -> Tensor:
        return self.embedding(token_ids, offsets)


class ProductTextEncoder(nn.Module):
    """Text vectors of products by product index, one shared TokenBagEncoder for all fields.

    Args:
        bags: text field name (e.g. "name", "category") -> (token_ids (T_f,), offsets (P + 1,)),
            numpy arrays or tensors, with one bag per product index 0..P-1. Row 0 is the
            reserved unknown product, whose bag is normally empty.
        vocab_size: number of token ids.
        dim: embedding size D.

    `forward(product)` maps (N,) int64 product indices to a dict field -> (N, D). The bags are
    non-persistent buffers: they come from the prepared data, not from a checkpoint.
    `encode_bags` embeds bags that are not in the buffers, such as a new product's text.
    """

    def __init__(
        self,
        bags: Mapping[str, tuple[np.ndarray | Tensor, np.ndarray | Tensor]],
        vocab_size: int,
        dim: int,
    ) -> None:
        super().__init__()
        if not bags:
            raise ValueError("bags is empty, but a product text encoder needs a text field")
        self.fields = tuple(bags)
        self.bag_encoder = TokenBagEncoder(vocab_size, dim)
        num_products = {len(offsets) - 1 for _, offsets in bags.values()}
        if len(num_products) != 1:
            raise ValueError(f"text fields have different product counts: {sorted(num_products)}")
        self.num_products = num_products.pop()
        for field, (token_ids, offsets) in bags.items():
            token_ids = torch.as_tensor(token_ids, dtype=torch.int64)
            if len(token_ids) and int(token_ids.max()) >= vocab_size:
                raise ValueError(
                    f"text field {field!r} has token id {int(token_ids.max())}, beyond "
                    f"vocab_size {vocab_size}; build the encoder with the tokenizer's vocab_size"
                )
            self.register_buffer(f"{field}_token_ids", token_ids, persistent=False)
            self.register_buffer(
                f"{field}_offsets", torch.as_tensor(offsets, dtype=torch.int64), persistent=False
            )

    def forward(self, product: Tensor) -> dict[str, Tensor]:
        return {field: self._encode_field(field, product) for field in self.fields}

    def encode_bags(self, token_ids: Tensor, offsets: Tensor) -> Tensor:
        """Embed (T,) token ids with (N + 1,) offsets through the shared table: (N, D)."""
        return self.bag_encoder(token_ids, offsets)

    def _encode_field(self, field: str, product: Tensor) -> Tensor:
        token_ids, offsets = gather_bags(
            getattr(self, f"{field}_token_ids"), getattr(self, f"{field}_offsets"), product
        )
        return self.bag_encoder(token_ids, offsets)


def gather_bags(token_ids: Tensor, offsets: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Select the bags `index` (N,) int64 from flat bags (T,) and (P + 1,), in that order.

    Returns the (T',) token ids and (N + 1,) offsets of the selected bags. Vectorized: the
    output position j of bag i reads token_ids[offsets[index[i]] + j - new_offsets[i]].
    """
    start = offsets[index]
    lengths = offsets[index + 1] - start
    new_offsets = torch.zeros(len(index) + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(lengths, dim=0, out=new_offsets[1:])
    shift = torch.repeat_interleave(start - new_offsets[:-1], lengths)
    positions = torch.arange(len(shift), device=index.device) + shift
    return token_ids[positions], new_offsets


class CategoricalEmbeddings(nn.Module):
    """One embedding table per categorical field, kept separate for a feature cross.

    Args:
        vocab_sizes: field name (e.g. "city", "store") -> number of indices including index 0,
            which is the learned vector of values that the mapping has not seen (not padding).
        dim: embedding size D.

    `forward(features)` reads features[name] (N,) int64 for every field and returns a dict
    name -> (N, D).
    """

    def __init__(self, vocab_sizes: Mapping[str, int], dim: int) -> None:
        super().__init__()
        for name, size in vocab_sizes.items():
            if size < 2:
                raise ValueError(
                    f"vocabulary size of categorical field {name!r} is {size}. It must count "
                    "the unknown index 0 and at least one value, as in the prepared meta.json"
                )
        self.tables = nn.ModuleDict(
            {name: nn.Embedding(size, dim) for name, size in vocab_sizes.items()}
        )

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.tables.keys())

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        embedded = {}
        for name, table in self.tables.items():
            if name not in features:
                raise KeyError(
                    f"categorical field {name!r} is missing from the batch, which has "
                    f"{sorted(features)}. Add it to the dataset or turn the feature off"
                )
            embedded[name] = table(features[name])
        return embedded


def calendar_features(
    timestamp: Tensor, utc_offset_hours: float = MOSCOW_UTC_OFFSET_HOURS
) -> dict[str, Tensor]:
    """Compute the hour of day, weekday and month of (N,) int64 unix-second timestamps.

    The local time is UTC plus `utc_offset_hours` (fractional offsets such as 5.5 work).

    Returns:
        "hour" (N,) int64 in 0..23, "weekday" (N,) int64 in 0..6 with Monday = 0, and "month"
        (N,) int64 in 0..11 with January = 0.
    """
    local = timestamp.to(torch.int64) + round(utc_offset_hours * HOUR_SECONDS)
    days = local // DAY_SECONDS  # floor division, also before 1970
    hour = (local - days * DAY_SECONDS) // HOUR_SECONDS
    weekday = torch.remainder(days + 3, 7)  # 1970-01-01 was a Thursday
    return {"hour": hour, "weekday": weekday, "month": _month_of_days(days)}


def _month_of_days(days: Tensor) -> Tensor:
    """Return the month index 0..11 of (N,) int64 days since 1970-01-01 (proleptic Gregorian).

    Integer arithmetic only: the calendar repeats every 400 years (146097 days), and counting
    years from March 1 puts the leap day at the end of the year. The tests compare the result
    with Python's datetime.
    """
    shifted = days + 719468  # days since 0000-03-01
    era = shifted // 146097
    day_of_era = shifted - era * 146097
    year_of_era = (
        day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_from_march = (5 * day_of_year + 2) // 153  # 0 = March, 11 = February
    return torch.remainder(month_from_march + 2, 12)


def log_time_buckets(seconds: Tensor, num_buckets: int = DEFAULT_GAP_BUCKETS) -> Tensor:
    """Bucket (N,) non-negative durations in seconds on a log scale into 1..num_buckets-1.

    Bucket 1 + floor(ln(max(seconds, 1)) / LOG_GAP_BUCKET_WIDTH), clamped to num_buckets - 1,
    so 0 and 1 second share bucket 1 and each later bucket spans a factor of about 1.35.
    Bucket 0 stays free for FIRST_EVENT_BUCKET. Negative durations are treated as 0.
    """
    if num_buckets < 2:
        raise ValueError(
            f"num_buckets is {num_buckets}. Use at least 2, one of them for first events"
        )
    clamped = seconds.to(torch.float64).clamp(min=1.0)
    bucket = torch.floor(torch.log(clamped) / LOG_GAP_BUCKET_WIDTH).to(torch.int64) + 1
    return bucket.clamp(max=num_buckets - 1)


def time_gap_buckets(
    timestamp: Tensor, lengths: Tensor, num_buckets: int = DEFAULT_GAP_BUCKETS
) -> Tensor:
    """Bucket the gap from each event to the previous event of its own sequence.

    Args:
        timestamp: (N,) int64 unix seconds of B sequences concatenated, each sorted by time.
        lengths: (B,) int64 events per sequence, summing to N. Empty sequences are allowed.
        num_buckets: size of the bucket vocabulary, FIRST_EVENT_BUCKET included.

    Returns:
        (N,) int64: FIRST_EVENT_BUCKET (0) for the first event of each sequence, otherwise
        `log_time_buckets(gap)`. A negative gap (unsorted input) counts as 0 seconds.
    """
    gap = torch.zeros_like(timestamp, dtype=torch.int64)
    gap[1:] = timestamp[1:] - timestamp[:-1]
    bucket = log_time_buckets(gap, num_buckets)
    starts = torch.cumsum(lengths, dim=0) - lengths
    starts = starts[lengths > 0]
    bucket[starts] = FIRST_EVENT_BUCKET
    return bucket


class TimeEncoder(nn.Module):
    """Sum of the embeddings of hour, weekday, month and the gap to the previous event.

    Args:
        dim: embedding size D.
        calendar: embed hour of day (24), weekday (7) and month (12).
        gap: embed the log-bucketed gap to the previous event (`time_gap_buckets`).
        utc_offset_hours: time zone of the calendar features, hours east of UTC.
        num_gap_buckets: size of the gap vocabulary.

    `forward(timestamp, lengths)` takes (N,) int64 unix seconds and (B,) int64 sequence lengths
    and returns (N, D). `lengths` is only read when `gap` is on. `encode_fields` returns the
    separate (N, D) vectors for a feature cross.
    """

    def __init__(
        self,
        dim: int,
        calendar: bool = True,
        gap: bool = True,
        utc_offset_hours: float = MOSCOW_UTC_OFFSET_HOURS,
        num_gap_buckets: int = DEFAULT_GAP_BUCKETS,
    ) -> None:
        super().__init__()
        if not calendar and not gap:
            raise ValueError("TimeEncoder needs calendar or gap features, but both are off")
        if not -24.0 < utc_offset_hours < 24.0:
            raise ValueError(f"utc_offset_hours is {utc_offset_hours}. Use a value in (-24, 24)")
        self.utc_offset_hours = utc_offset_hours
        self.num_gap_buckets = num_gap_buckets
        sizes = {}
        if calendar:
            sizes.update(hour=NUM_HOURS, weekday=NUM_WEEKDAYS, month=NUM_MONTHS)
        if gap:
            sizes["gap"] = num_gap_buckets
        self.tables = nn.ModuleDict({name: nn.Embedding(size, dim) for name, size in sizes.items()})

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.tables.keys())

    def indices(self, timestamp: Tensor, lengths: Tensor | None = None) -> dict[str, Tensor]:
        """Return the (N,) int64 index of every enabled field."""
        result: dict[str, Tensor] = {}
        if "hour" in self.tables:
            result.update(calendar_features(timestamp, self.utc_offset_hours))
        if "gap" in self.tables:
            if lengths is None:
                raise ValueError("the gap feature needs the sequence lengths of the timestamps")
            result["gap"] = time_gap_buckets(timestamp, lengths, self.num_gap_buckets)
        return result

    def encode_fields(self, timestamp: Tensor, lengths: Tensor | None = None) -> dict[str, Tensor]:
        """Return field name -> (N, D) embedding for every enabled field."""
        indices = self.indices(timestamp, lengths)
        return {name: table(indices[name]) for name, table in self.tables.items()}

    def forward(self, timestamp: Tensor, lengths: Tensor | None = None) -> Tensor:
        embedded = self.encode_fields(timestamp, lengths)
        return torch.stack(list(embedded.values())).sum(dim=0)

    def embed(self, timestamp: Tensor, gap_buckets: Tensor | None = None) -> Tensor:
        """Sum the field embeddings with given gap buckets: `forward` for gaps that are not the
        gaps inside one sequence, such as a request's gap to its scoring state.

        Args:
            timestamp: (N,) int64 unix seconds.
            gap_buckets: (N,) int64 indices in 0..num_gap_buckets-1, required when `gap` is on.

        Returns:
            (N, D) sum of the enabled fields' embeddings.
        """
        indices: dict[str, Tensor] = {}
        if "hour" in self.tables:
            indices.update(calendar_features(timestamp, self.utc_offset_hours))
        if "gap" in self.tables:
            if gap_buckets is None:
                raise ValueError("the gap feature needs gap buckets, but none were given")
            indices["gap"] = gap_buckets
        total = None
        for name, table in self.tables.items():
            embedded = table(indices[name])
            total = embedded if total is None else total + embedded
        assert total is not None
        return total
