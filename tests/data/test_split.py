from __future__ import annotations

import collections

import polars as pl
import pytest

from cartformer.config import DAY_SECONDS, DataConfig
from cartformer.data.encoding import IdMapping
from cartformer.data.schema import ACTION_CODES, CART, POSITIVE_ACTIONS, VIEW
from cartformer.data.split import (
    EVENT_SORT_KEYS,
    SplitBoundaries,
    SplitResult,
    encode_events,
    split_events,
)

T_MAX = 1_800_000_000
EARLY = T_MAX - 100 * DAY_SECONDS  # a time inside the training period


def raw_rows(rows: list[tuple]) -> pl.DataFrame:
    """Build raw input from (action_type, user_id, request_id, product_id, source_type, ts)."""
    return pl.DataFrame(
        rows,
        schema={
            "action_type": pl.String,
            "user_id": pl.UInt64,
            "request_id": pl.UInt64,
            "product_id": pl.UInt64,
            "source_type": pl.String,
            "timestamp": pl.Int64,
        },
        orient="row",
    )


def request(
    user: int,
    request_id: int,
    products: list[int],
    carts: list[int],
    source: str = "ST_Search",
    t: int = EARLY,
) -> list[tuple]:
    """Rows of one request: a view per product at t + i, a cart row per cart product."""
    views = [("AT_View", user, request_id, p, source, t + i) for i, p in enumerate(products)]
    cart_rows = [("AT_CartUpdate", user, request_id, p, source, t + 100) for p in carts]
    return views + cart_rows


def last_purchase(user: int = 1) -> list[tuple]:
    """A purchase at T_MAX, which fixes the split boundaries."""
    return [("AT_Purchase", user, None, 1, None, T_MAX)]


def run_split(frame: pl.DataFrame, cfg: DataConfig | None = None) -> tuple[SplitResult, tuple]:
    mappings = (
        IdMapping.fit("user", frame["user_id"]),
        IdMapping.fit("product", frame["product_id"]),
        IdMapping.fit("source", frame["source_type"]),
    )
    encoded = encode_events(frame.lazy(), *mappings)
    return split_events(encoded, mappings[2], cfg or DataConfig()), mappings


def test_boundaries_from_max_timestamp() -> None:
    split = SplitBoundaries.from_max_timestamp(T_MAX, DataConfig())
    assert split.valid_end == T_MAX
    assert split.valid_start == T_MAX - 30 * DAY_SECONDS
    assert split.train_end == T_MAX - 32 * DAY_SECONDS


def test_boundaries_iso_dates() -> None:
    values = SplitBoundaries(train_end=0, valid_start=86400, valid_end=86401).to_dict()
    assert values["train_end_iso"] == "1970-01-01T00:00:00+00:00"
    assert values["valid_start"] == 86400


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (0, "train"),  # train_end itself
        (1, "none"),
        (2 * DAY_SECONDS, "none"),  # valid_start itself
        (2 * DAY_SECONDS + 1, "valid"),
        (32 * DAY_SECONDS, "valid"),  # valid_end itself
        (32 * DAY_SECONDS + 1, "none"),
    ],
)
def test_split_expr_edges(offset: int, expected: str) -> None:
    split = SplitBoundaries.from_max_timestamp(T_MAX, DataConfig())
    frame = pl.DataFrame({"timestamp": [split.train_end + offset]})
    assert frame.select(split.split_expr().alias("split"))["split"].item() == expected


def test_request_kept() -> None:
    products = list(range(20, 10, -1))  # 10 products, in descending id order
    frame = raw_rows(request(1, 5, products, carts=[15]) + last_purchase())
    result, (users, items, sources) = run_split(frame)

    assert result.requests.height == 1
    row = result.requests.row(0, named=True)
    assert items.decode(pl.Series(row["product"])).to_list() == list(range(11, 21))
    assert row["target"] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert row["timestamp"] == EARLY
    assert row["request_id"] == 5
    assert row["split"] == "train"
    assert sources.decode(pl.Series([row["source"]])).item() == "ST_Search"
    assert users.decode(pl.Series([row["user"]])).item() == 1


def test_requests_schema() -> None:
    frame = raw_rows(request(1, 5, list(range(10)), carts=[3]) + last_purchase())
    result, _ = run_split(frame)
    assert dict(result.requests.schema) == {
        "user": pl.Int32,
        "request_id": pl.UInt64,
        "timestamp": pl.Int64,
        "source": pl.Int32,
        "product": pl.List(pl.Int32),
        "target": pl.List(pl.Int8),
        "split": pl.String,
    }


def test_small_request_dropped() -> None:
    frame = raw_rows(request(1, 5, list(range(9)), carts=[3]) + last_purchase())
    result, _ = run_split(frame)
    assert result.requests.height == 0
    assert result.counts["requests_too_small"] == 1


def test_min_request_size_setting() -> None:
    frame = raw_rows(request(1, 5, list(range(9)), carts=[3]) + last_purchase())
    result, _ = run_split(frame, DataConfig(min_request_size=9))
    assert result.requests.height == 1


def test_request_without_cart_dropped() -> None:
    frame = raw_rows(request(1, 5, list(range(10)), carts=[]) + last_purchase())
    result, _ = run_split(frame)
    assert result.requests.height == 0
    assert result.counts["requests_without_cart"] == 1


def test_request_without_view_dropped() -> None:
    # Every product also has a cart row, so every group's max action is a cart.
    frame = raw_rows(request(1, 5, list(range(10)), carts=list(range(10))) + last_purchase())
    result, _ = run_split(frame)
    assert result.requests.height == 0
    assert result.counts["requests_without_view"] == 1


def test_catalog_rows_excluded() -> None:
    rows = request(1, 5, list(range(10)), carts=[3], source="ST_Catalog") + last_purchase()
    result, _ = run_split(raw_rows(rows))
    assert result.requests.height == 0
    assert result.counts["rows_view_cart_excluded_surface"] == 11


def test_excluded_surfaces_setting() -> None:
    rows = request(1, 5, list(range(10)), carts=[3], source="ST_Catalog") + last_purchase()
    result, _ = run_split(raw_rows(rows), DataConfig(excluded_surfaces=()))
    assert result.requests.height == 1


def test_catalog_rows_removed_before_grouping() -> None:
    # The cart of product 3 happens on the catalog, so the request has no cart left.
    rows = request(1, 5, list(range(10)), carts=[]) + [
        ("AT_CartUpdate", 1, 5, 3, "ST_Catalog", EARLY + 50)
    ]
    result, _ = run_split(raw_rows(rows + last_purchase()))
    assert result.counts["requests_without_cart"] == 1


def test_group_takes_max_action_and_min_time() -> None:
    rows = request(1, 5, list(range(10)), carts=[]) + [
        ("AT_CartUpdate", 1, 5, 4, "ST_Search", EARLY - 7)
    ]
    result, (_, items, _) = run_split(raw_rows(rows + last_purchase()))
    row = result.requests.row(0, named=True)
    position = row["product"].index(items.encode(pl.Series([4])).item())
    assert row["target"][position] == 1
    assert row["timestamp"] == EARLY - 7


def test_group_surface_mode_tie_smallest() -> None:
    # Products 0..4 have one row on ST_Main and one on ST_Search: a tie, so the smaller index
    # wins. Products 5..9 have two rows on ST_Search and one on ST_Main. The request's surface
    # is the most common group surface.
    rows = []
    for product in range(10):
        sources = ["ST_Main", "ST_Search"] if product < 5 else ["ST_Search", "ST_Search", "ST_Main"]
        for i, source in enumerate(sources):
            action = "AT_CartUpdate" if product == 0 and i == 0 else "AT_View"
            rows.append((action, 1, 5, product, source, EARLY + i))
    result, (_, _, sources_map) = run_split(raw_rows(rows + last_purchase()))

    row = result.requests.row(0, named=True)
    main = sources_map.encode(pl.Series(["ST_Main"])).item()
    search = sources_map.encode(pl.Series(["ST_Search"])).item()
    assert main < search
    assert row["source"] == main  # five groups on ST_Main, five on ST_Search: tie


def test_request_surface_mode() -> None:
    rows = request(1, 5, list(range(7)), carts=[1], source="ST_Search")
    rows += request(1, 5, list(range(7, 10)), carts=[], source="ST_Main")
    result, (_, _, sources) = run_split(raw_rows(rows + last_purchase()))
    row = result.requests.row(0, named=True)
    assert sources.decode(pl.Series([row["source"]])).item() == "ST_Search"


def test_request_id_shared_by_users() -> None:
    rows = request(1, 5, list(range(10)), carts=[2]) + request(2, 5, list(range(10)), carts=[3])
    result, _ = run_split(raw_rows(rows + last_purchase()))
    assert result.requests.height == 2
    assert result.counts["request_ids_shared_by_users"] == 1


def test_clicks_are_not_candidates() -> None:
    rows = request(1, 5, list(range(9)), carts=[2]) + [("AT_Click", 1, 5, 50, "ST_Search", EARLY)]
    result, _ = run_split(raw_rows(rows + last_purchase()))
    assert result.requests.height == 0
    assert result.counts["requests_too_small"] == 1


def test_requestless_views_counted() -> None:
    rows = request(1, 5, list(range(10)), carts=[2]) + [("AT_View", 1, None, 3, "ST_Main", EARLY)]
    result, _ = run_split(raw_rows(rows + last_purchase()))
    assert result.requests.height == 1
    assert result.counts["rows_view_cart_without_request"] == 1


def test_request_split_assignment() -> None:
    split = SplitBoundaries.from_max_timestamp(T_MAX, DataConfig())
    rows = request(1, 1, list(range(10)), carts=[1], t=split.train_end - 200)
    rows += request(1, 2, list(range(10)), carts=[1], t=split.train_end + 10)
    rows += request(1, 3, list(range(10)), carts=[1], t=split.valid_start + 10)
    result, _ = run_split(raw_rows(rows + last_purchase()))
    assert result.requests["split"].to_list() == ["train", "none", "valid"]
    assert result.counts["requests_train"] == 1
    assert result.counts["requests_none"] == 1
    assert result.counts["requests_valid"] == 1


def test_events_positive_and_sorted() -> None:
    rows = request(2, 5, list(range(10)), carts=[2, 3]) + [
        ("AT_Click", 1, 5, 50, "ST_Search", EARLY + 9),
        ("AT_Purchase", 1, None, 50, None, EARLY + 1),
    ]
    result, (_, _, sources) = run_split(raw_rows(rows + last_purchase()))

    events = result.events
    assert events.height == 5
    assert set(events["action"].to_list()) == set(POSITIVE_ACTIONS)
    assert events.equals(events.sort(EVENT_SORT_KEYS))
    purchase = events.filter(pl.col("action") == ACTION_CODES["AT_Purchase"])
    assert sources.decode(purchase["source"]).to_list() == ["<none>", "<none>"]
    assert result.counts["positive_events_train"] == 4


def plain_requests(frame: pl.DataFrame, cfg: DataConfig) -> dict[tuple, tuple]:
    """Compute the request groups with dicts and loops, keyed by raw (user, request_id).

    Values are (timestamp, source, sorted [(product, target)]).
    """
    groups: dict[tuple, list[tuple]] = collections.defaultdict(list)
    for row in frame.iter_rows(named=True):
        action = ACTION_CODES[row["action_type"]]
        if row["request_id"] is None or action not in (VIEW, CART):
            continue
        if row["source_type"] in cfg.excluded_surfaces:
            continue
        key = (row["user_id"], row["request_id"], row["product_id"])
        groups[key].append((action, row["timestamp"], row["source_type"]))

    requests: dict[tuple, list[tuple]] = collections.defaultdict(list)
    for (user, request_id, product), rows in groups.items():
        counts = collections.Counter(source for _, _, source in rows)
        top = max(counts.values())
        source = min(s for s, c in counts.items() if c == top)  # names sort like indices
        action = max(a for a, _, _ in rows)
        time = min(t for _, t, _ in rows)
        requests[(user, request_id)].append((product, action, time, source))

    accepted = {}
    for key, products in requests.items():
        targets = [a for _, a, _, _ in products]
        if len(products) < cfg.min_request_size or CART not in targets or VIEW not in targets:
            continue
        counts = collections.Counter(source for *_, source in products)
        top = max(counts.values())
        source = min(s for s, c in counts.items() if c == top)
        time = min(t for _, _, t, _ in products)
        accepted[key] = (time, source, sorted((p, a) for p, a, _, _ in products))
    return accepted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_requests_match_plain_loop(make_frame, seed: int) -> None:
    frame = make_frame(seed=seed, num_requests=400)
    cfg = DataConfig()
    result, (users, items, sources) = run_split(frame, cfg)

    expected = plain_requests(frame, cfg)
    decoded = result.requests.with_columns(
        users.decode(result.requests["user"]).alias("user"),
        sources.decode(result.requests["source"]).alias("source"),
    )
    actual = {}
    for row in decoded.iter_rows(named=True):
        raw_products = items.decode(pl.Series(row["product"], dtype=pl.Int32)).to_list()
        pairs = list(zip(raw_products, row["target"], strict=True))
        actual[(row["user"], row["request_id"])] = (row["timestamp"], row["source"], pairs)
    assert len(expected) > 20
    assert actual == expected
