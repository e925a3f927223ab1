"""Tests of the demo data generator on its tiny size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cartformer.data import demo
from cartformer.data.demo import (
    DEMO_SIZES,
    EVENT_SCHEMA,
    ORACLE_SCHEMA,
    generate_demo,
    oracle_path_for,
    write_demo,
)
from cartformer.data.demo_simulation import (
    LOCAL_UTC_OFFSET_SECONDS,
    START_TIMESTAMP,
    Simulation,
    local_calendar,
    simulate,
)
from cartformer.data.demo_vocab import CATEGORIES, DAYPART_HOURS, IMAGE_URL_PREFIX
from cartformer.data.demo_world import SURFACES, DemoSize, World, build_world
from cartformer.data.schema import CART

DAY = 24 * 60 * 60
REQUEST_COLUMNS = ("request_id", "source_type", "position_in_request")


@pytest.fixture(scope="module")
def tiny() -> tuple[pl.DataFrame, pl.DataFrame]:
    return generate_demo("tiny", seed=0)


MEDIUM = DemoSize(
    num_users=150, num_products=800, num_stores=12, num_cities=3, sessions_per_day=0.1
)
"""Large enough for the side-feature signal to stand out of the noise, about 2 s to simulate."""


@pytest.fixture(scope="module")
def medium() -> tuple[World, Simulation]:
    rng = np.random.default_rng(0)
    world = build_world(MEDIUM, rng)
    return world, simulate(MEDIUM, world, rng)


@pytest.fixture(scope="module")
def events(tiny: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    return tiny[0]


@pytest.fixture(scope="module")
def oracle(tiny: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    return tiny[1]


def test_event_schema_exact(events: pl.DataFrame) -> None:
    assert list(events.columns) == list(EVENT_SCHEMA)
    assert dict(events.schema) == EVENT_SCHEMA


def test_oracle_schema_exact(oracle: pl.DataFrame) -> None:
    assert dict(oracle.schema) == ORACLE_SCHEMA


def test_nulls_only_on_purchases(events: pl.DataFrame) -> None:
    purchase = events["action_type"] == "AT_Purchase"
    for name in REQUEST_COLUMNS:
        assert (events[name].is_null() == purchase).all(), name
    for name in set(EVENT_SCHEMA) - set(REQUEST_COLUMNS):
        assert events[name].null_count() == 0, name


def test_all_actions_present(events: pl.DataFrame) -> None:
    actions = set(events["action_type"].unique())
    assert actions == {"AT_View", "AT_Click", "AT_CartUpdate", "AT_Purchase"}


def test_same_seed_identical() -> None:
    first_events, first_oracle = generate_demo("tiny", seed=7)
    second_events, second_oracle = generate_demo("tiny", seed=7)
    assert first_events.equals(second_events)
    assert first_oracle.equals(second_oracle)


def test_different_seeds_differ(events: pl.DataFrame) -> None:
    other, _ = generate_demo("tiny", seed=1)
    assert not events.equals(other)
    assert set(events["user_id"]).isdisjoint(set(other["user_id"]))


def test_oracle_covers_shown_pairs(events: pl.DataFrame, oracle: pl.DataFrame) -> None:
    shown = events.filter(pl.col("action_type") == "AT_View").select("request_id", "product_id")
    assert shown.is_duplicated().sum() == 0
    assert oracle.select("request_id", "product_id").is_duplicated().sum() == 0
    assert oracle.height == shown.height
    missing = shown.join(oracle, on=["request_id", "product_id"], how="anti")
    assert missing.height == 0


def test_every_request_row_was_shown(events: pl.DataFrame) -> None:
    shown = events.filter(pl.col("action_type") == "AT_View").select("request_id", "product_id")
    others = events.filter(pl.col("action_type").is_in(["AT_Click", "AT_CartUpdate"]))
    assert others.join(shown, on=["request_id", "product_id"], how="anti").height == 0


def test_oracle_probabilities_valid(oracle: pl.DataFrame) -> None:
    probability = oracle["cart_probability"]
    assert probability.min() > 0.0
    assert probability.max() < 1.0


def test_carted_pairs_more_probable(events: pl.DataFrame, oracle: pl.DataFrame) -> None:
    carted = events.filter(pl.col("action_type") == "AT_CartUpdate").select(
        "request_id", "product_id", carted=pl.lit(True)
    )
    labelled = oracle.join(carted.unique(), on=["request_id", "product_id"], how="left")
    mean = labelled.group_by(pl.col("carted").fill_null(False)).agg(
        pl.col("cart_probability").mean()
    )
    by_label = dict(zip(mean["carted"], mean["cart_probability"], strict=True))
    assert by_label[True] > 2 * by_label[False]


def test_views_far_outnumber_carts(events: pl.DataFrame) -> None:
    counts = dict(events["action_type"].value_counts().iter_rows())
    assert counts["AT_View"] > 5 * counts["AT_CartUpdate"]
    assert counts["AT_View"] > 5 * counts["AT_Click"]


def test_purchases_follow_carts(events: pl.DataFrame) -> None:
    keys = ["user_id", "product_id", "store_id"]
    carts = (
        events.filter(pl.col("action_type") == "AT_CartUpdate")
        .select(*keys, cart_time="timestamp")
        .sort("cart_time")
    )
    purchases = events.filter(pl.col("action_type") == "AT_Purchase").select(*keys, "timestamp")
    matched = purchases.sort("timestamp").join_asof(
        carts,
        left_on="timestamp",
        right_on="cart_time",
        by=keys,
        strategy="backward",
        check_sortedness=False,
    )
    delay = matched["timestamp"] - matched["cart_time"]
    assert matched["cart_time"].null_count() == 0
    assert delay.min() > 0
    assert delay.max() < 2 * 60 * 60


def test_most_carts_purchased(events: pl.DataFrame) -> None:
    keys = ["user_id", "product_id", "store_id"]
    carted = events.filter(pl.col("action_type") == "AT_CartUpdate").select(keys).unique()
    bought = events.filter(pl.col("action_type") == "AT_Purchase").select(keys).unique()
    share = carted.join(bought, on=keys, how="semi").height / carted.height
    assert share > 0.7


def test_span_about_thirteen_months(events: pl.DataFrame) -> None:
    span_days = (events["timestamp"].max() - events["timestamp"].min()) / DAY
    assert 370 < span_days < 400


def test_rows_unsorted(events: pl.DataFrame) -> None:
    assert not events["timestamp"].is_sorted()
    assert not events["user_id"].is_sorted()
    assert not events["request_id"].drop_nulls().is_sorted()


def test_ids_spread_over_uint64(events: pl.DataFrame) -> None:
    for name in ("user_id", "product_id", "store_id", "request_id"):
        assert events[name].max() > 2**62, name


def test_request_lists_well_formed(events: pl.DataFrame) -> None:
    views = events.filter(pl.col("action_type") == "AT_View")
    lists = views.group_by("request_id").agg(
        size=pl.len(),
        products=pl.col("product_id").n_unique(),
        max_position=pl.col("position_in_request").max(),
        positions=pl.col("position_in_request").n_unique(),
        users=pl.col("user_id").n_unique(),
        surfaces=pl.col("source_type").n_unique(),
        stores=pl.col("store_id").n_unique(),
        times=pl.col("timestamp").n_unique(),
    )
    assert (lists["products"] == lists["size"]).all()
    assert (lists["positions"] == lists["size"]).all()
    assert (lists["max_position"] == lists["size"] - 1).all()
    for name in ("users", "surfaces", "stores", "times"):
        assert (lists[name] == 1).all(), name
    assert lists["size"].max() <= max(surface.max_size for surface in SURFACES)
    assert (lists["size"] >= 10).mean() > 0.4


def test_surfaces_known(events: pl.DataFrame) -> None:
    names = {surface.name for surface in SURFACES}
    assert len(names) == 12
    assert set(events["source_type"].drop_nulls().unique()) <= names
    assert "ST_Catalog" in set(events["source_type"])


def test_store_in_user_city(events: pl.DataFrame) -> None:
    assert events.group_by("store_id").agg(pl.col("city_name").n_unique())["city_name"].max() == 1
    assert events.group_by("user_id").agg(pl.col("city_name").n_unique())["city_name"].max() == 1
    assert events.group_by("user_id").agg(pl.col("store_id").n_unique())["store_id"].max() <= 2


def test_product_attributes_fixed(events: pl.DataFrame) -> None:
    attributes = events.group_by("product_id").agg(
        pl.col("product_name", "product_category", "product_image").n_unique()
    )
    for name in ("product_name", "product_category", "product_image"):
        assert attributes[name].max() == 1, name


def test_product_text_russian(events: pl.DataFrame) -> None:
    categories = {category.name for category in CATEGORIES}
    assert set(events["product_category"].unique()) <= categories
    assert events["product_name"].str.contains("[а-яА-ЯёЁ]").all()
    assert events["product_image"].str.starts_with(IMAGE_URL_PREFIX).all()


def test_full_size_matches_real_file() -> None:
    full = DEMO_SIZES["full"]
    assert full.num_users == 3550
    assert full.num_products == 26522
    assert full.num_stores == 627
    assert full.num_cities == 12
    assert 390 <= full.num_days <= 400


def test_unknown_size_rejected() -> None:
    with pytest.raises(ValueError, match="unknown demo size 'huge'"):
        generate_demo("huge")


def test_oracle_path_beside_data() -> None:
    assert oracle_path_for("runs/demo/train.parquet") == Path("runs/demo/train.oracle.parquet")


def test_write_matches_generate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    monkeypatch.setattr(demo, "WRITE_CHUNK_ROWS", 1000)
    data_path, oracle_path = write_demo(tmp_path / "nested" / "train.parquet", size="tiny")
    assert data_path == tmp_path / "nested" / "train.parquet"
    assert oracle_path == tmp_path / "nested" / "train.oracle.parquet"
    assert pl.read_parquet(data_path).equals(tiny[0])
    assert pl.read_parquet(oracle_path).equals(tiny[1])


def test_write_rejects_other_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must end in \.parquet"):
        write_demo(tmp_path / "train.csv", size="tiny")


def test_tiny_is_fast_and_small(events: pl.DataFrame) -> None:
    assert 2_000 < events.height < 50_000
    assert np.isin(["AT_View"], events["action_type"].unique().to_numpy()).all()


def _cart_log_share(
    world: World, simulation: Simulation, group: np.ndarray, num_groups: int
) -> np.ndarray:
    """Return the (G, C) log ratio of each group's category share of carts to the overall share.

    `group` is the (carts,) group index of each cart row. Counts get add-one smoothing.
    """
    num_categories = len(CATEGORIES)
    cart = simulation.action == CART
    category = world.product_category[simulation.product[cart]]
    counts = np.zeros((num_groups, num_categories))
    np.add.at(counts, (group, category), 1)
    share = (counts + 1) / (counts + 1).sum(axis=1, keepdims=True)
    overall = (counts.sum(axis=0) + 1) / (counts.sum() + num_categories)
    return np.log(share / overall)


def test_cart_share_follows_daypart(medium: tuple[World, Simulation]) -> None:
    world, simulation = medium
    cart = simulation.action == CART
    hour, _, _ = local_calendar(simulation.timestamp[cart])
    daypart_of_hour = np.empty(24, dtype=np.int64)
    for index, (start, end) in enumerate(DAYPART_HOURS):
        daypart_of_hour[np.arange(start, end) % 24] = index
    observed = _cart_log_share(world, simulation, daypart_of_hour[hour], len(DAYPART_HOURS))
    effect = world.hour_category_effect[[start for start, _ in DAYPART_HOURS]]
    effect = effect - effect.mean(axis=0)
    assert np.corrcoef(observed.ravel(), effect.ravel())[0, 1] > 0.5


def test_morning_coffee_evening_meat(medium: tuple[World, Simulation]) -> None:
    world, simulation = medium
    cart = simulation.action == CART
    hour, _, _ = local_calendar(simulation.timestamp[cart])
    category = world.product_category[simulation.product[cart]]
    names = [category.name for category in CATEGORIES]
    coffee, meat = names.index("Чай и кофе"), names.index("Мясо и птица")
    morning = (hour >= 6) & (hour < 11)
    evening = (hour >= 16) & (hour < 22)
    assert (category[morning] == coffee).mean() > 1.5 * (category[evening] == coffee).mean()
    assert (category[evening] == meat).mean() > 1.5 * (category[morning] == meat).mean()


def test_cart_share_follows_city(medium: tuple[World, Simulation]) -> None:
    world, simulation = medium
    cart = simulation.action == CART
    city = world.store_city[simulation.store[cart]]
    observed = _cart_log_share(world, simulation, city, MEDIUM.num_cities)
    effect = world.city_category_effect - world.city_category_effect.mean(axis=0)
    assert np.corrcoef(observed.ravel(), effect.ravel())[0, 1] > 0.3


def test_city_stores_share_assortment(medium: tuple[World, Simulation]) -> None:
    world, _ = medium
    carried = world.in_assortment.astype(np.float64)
    common = carried @ carried.T
    sizes = carried.sum(axis=1)
    jaccard = common / (sizes[:, None] + sizes[None, :] - common)
    same_city = world.store_city[:, None] == world.store_city[None, :]
    other_store = ~np.eye(len(sizes), dtype=bool)
    assert jaccard[same_city & other_store].mean() > jaccard[~same_city].mean() + 0.03


def test_store_category_depth(medium: tuple[World, Simulation]) -> None:
    world, _ = medium
    depth = np.stack(
        [
            world.in_assortment[:, world.product_category == category].mean(axis=1)
            for category in range(len(CATEGORIES))
        ],
        axis=1,
    )
    relative = depth - depth.mean(axis=1, keepdims=True)
    assert np.corrcoef(relative.ravel(), world.store_category_effect.ravel())[0, 1] > 0.5


def test_names_share_tokens_in_category(events: pl.DataFrame) -> None:
    products = events.select("product_id", "product_name", "product_category").unique()
    words = products.select("product_category", word=pl.col("product_name").str.extract(r"^(\S+)"))
    per_category = words.group_by("product_category").agg(
        products=pl.len(), nouns=pl.col("word").n_unique()
    )
    assert (per_category["nouns"] < per_category["products"]).all()
    categories_per_noun = words.unique().group_by("word").agg(pl.col("product_category").n_unique())
    assert (categories_per_noun["product_category"] == 1).mean() > 0.9


def test_sessions_follow_local_hours(events: pl.DataFrame) -> None:
    local_hour = ((pl.col("timestamp") + LOCAL_UTC_OFFSET_SECONDS) // 3600) % 24
    views = events.filter(pl.col("action_type") == "AT_View").select(hour=local_hour)
    night = views.filter(pl.col("hour").is_between(2, 5)).height
    evening = views.filter(pl.col("hour").is_between(18, 21)).height
    assert evening > 5 * night


def test_span_starts_moscow_midnight(events: pl.DataFrame) -> None:
    assert events["timestamp"].min() >= START_TIMESTAMP
    assert events["timestamp"].min() < START_TIMESTAMP + 2 * DAY
    hour, weekend, month = local_calendar(np.array([START_TIMESTAMP]))
    assert hour.tolist() == [0]
    assert month.tolist() == [8]
    assert weekend.tolist() == [False]
