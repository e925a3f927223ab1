"""The static part of the demo data: sizes, surfaces, products, stores and shoppers.

Everything here is drawn once per seed before the simulation of the days starts. The day loop
in `cartformer.data.demo_simulation` reads these arrays and never changes them, except the
shopper tastes that it moves along their random walk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cartformer.data.demo_vocab import (
    CATEGORIES,
    CITIES,
    DAYPART_HOURS,
    DAYPART_PREFERENCE,
    SEASON_PREFERENCE,
    WEEKEND_PREFERENCE,
)

TASTE_DIM = 12
"""Dimension of the latent taste space of products and shoppers."""
TASTE_STD = 1.0 / np.sqrt(TASTE_DIM)
"""Per-dimension standard deviation of the shopper tastes around their mean."""
TASTE_MEAN_STD = 0.25
"""Per-dimension standard deviation of the population mean taste."""
CATEGORY_BASE_WEIGHT = 0.5
CATEGORY_AFFINITY_STD = 0.5
NICHE_PENALTY = 4.0
"""Subtracted from the affinity of shoppers outside a niche category (babies, pets)."""
CITY_CATEGORY_STD = 0.4
"""Standard deviation of the city x category preference offset shared by a city's shoppers."""
CITY_TASTE_STD = 0.15
"""Per-dimension standard deviation of a city's shift of the mean taste of its shoppers."""
STORE_CATEGORY_STD = 0.6
"""Standard deviation of the store x category offset of the assortment logit (how deep a store
stocks a category). The simulation also adds part of it to the cart logit."""
CITY_PRODUCT_STD = 1.2
"""Standard deviation of the city x product offset of the assortment logit: regional ranges
that all stores of a city share."""
NOUN_VECTOR_STD = 0.6
BRAND_VECTOR_STD = 0.3
DESCRIPTOR_VECTOR_STD = 0.3
PRODUCT_NOISE_STD = 0.4
"""Per-dimension standard deviations of the parts of a product's taste vector: its noun, brand
and descriptor tokens, and noise that no name token explains."""
SUMMER_MONTHS = (5, 6, 7)
WINTER_MONTHS = (11, 0, 1)
"""Month indices (January = 0) of the seasons in SEASON_PREFERENCE."""


@dataclass(frozen=True)
class DemoSize:
    """Scale of one demo data set. Row counts follow from the activity settings."""

    num_users: int
    num_products: int
    num_stores: int
    num_cities: int
    sessions_per_day: float
    """Mean shopping sessions per shopper and day."""
    num_days: int = 395
    """Length of the span in days (13 months)."""


DEMO_SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(
        num_users=24, num_products=400, num_stores=6, num_cities=3, sessions_per_day=0.04
    ),
    "small": DemoSize(
        num_users=800, num_products=4000, num_stores=60, num_cities=12, sessions_per_day=0.1
    ),
    "full": DemoSize(
        num_users=3550, num_products=26522, num_stores=627, num_cities=12, sessions_per_day=0.186
    ),
}


@dataclass(frozen=True)
class Surface:
    """One surface (`source_type`) with how it fills its lists and how shoppers react to it."""

    name: str
    share: float
    """Share of all requests."""
    min_size: int
    max_size: int
    pool_mix: tuple[float, float, float, float]
    """Weights of the candidate pool sources: store popularity, request category, the shopper's
    recent purchases, uniform over the store's assortment."""
    category_mode: str
    """Rule that picks the request category: "browse", "intent", "anchor", "complement",
    "impulse" or "none" (the pool has no category source)."""
    rank_weights: tuple[float, float, float, float]
    """Weights of taste, popularity, purchased-before flag and Gumbel noise in the list order."""
    cart_offset: float
    """Added to the cart logit of every item the surface shows."""


SURFACES: tuple[Surface, ...] = (
    Surface("ST_Catalog", 0.22, 10, 40, (0.2, 0.8, 0.0, 0.0), "browse", (0.0, 1.0, 0.0, 0.7), 0.0),
    Surface("ST_Search", 0.14, 5, 30, (0.1, 0.8, 0.1, 0.0), "intent", (0.3, 0.6, 0.3, 0.6), 0.6),
    Surface(
        "ST_MainFeed", 0.12, 10, 30, (0.4, 0.4, 0.15, 0.05), "intent", (0.8, 0.3, 0.3, 1.0), 0.0
    ),
    Surface(
        "ST_Recommendations",
        0.08,
        10,
        40,
        (0.5, 0.3, 0.0, 0.2),
        "intent",
        (1.0, 0.2, 0.0, 1.0),
        -0.2,
    ),
    Surface("ST_BuyAgain", 0.07, 5, 25, (0.15, 0.0, 0.85, 0.0), "none", (0.2, 0.0, 1.5, 1.0), 0.3),
    Surface("ST_Favorites", 0.03, 5, 20, (0.1, 0.0, 0.9, 0.0), "none", (0.0, 0.3, 1.0, 1.0), 0.2),
    Surface(
        "ST_ProductCard", 0.08, 6, 20, (0.1, 0.9, 0.0, 0.0), "anchor", (0.4, 0.5, 0.0, 1.0), 0.0
    ),
    Surface(
        "ST_CartUpsell", 0.06, 5, 15, (0.1, 0.9, 0.0, 0.0), "complement", (0.2, 0.8, 0.0, 1.0), 0.1
    ),
    Surface("ST_Promo", 0.06, 8, 30, (0.6, 0.0, 0.0, 0.4), "none", (0.0, 0.3, 0.0, 2.0), 0.3),
    Surface("ST_Popular", 0.06, 10, 30, (1.0, 0.0, 0.0, 0.0), "none", (0.0, 1.5, 0.0, 0.7), -0.1),
    Surface("ST_Novelty", 0.04, 6, 20, (0.0, 0.0, 0.0, 1.0), "none", (0.3, 0.0, 0.0, 1.0), -0.5),
    Surface(
        "ST_Checkout", 0.04, 5, 12, (0.2, 0.8, 0.0, 0.0), "impulse", (0.0, 1.0, 0.0, 1.0), -0.3
    ),
)
"""The 12 surfaces. Only `ST_Catalog` is a name known from the real file, and the others are
invented names of the same form."""


@dataclass(frozen=True)
class World:
    """Static draws of one demo data set. P products, S stores, U users, C categories.

    Products are ordered by category, so the products of one category are a contiguous index
    range. Store assortments are stored as one flattened array: the products of store `s` are
    `assortment_product[assortment_start[s]:assortment_start[s + 1]]`, in product order.
    """

    city_names: list[str]
    store_city: np.ndarray  # (S,) int64 city index
    product_category: np.ndarray  # (P,) int64 category index
    category_start: np.ndarray  # (C + 1,) int64 first product index of each category
    product_popularity: np.ndarray  # (P,) float64 Zipf weight, sums to 1
    product_pop_z: np.ndarray  # (P,) float64 standardized log popularity
    product_vector: np.ndarray  # (P, TASTE_DIM) float64 taste vector inside the category
    product_cycle: np.ndarray  # (P,) float64 repeat cycle in days
    product_names: list[str]
    category_vector: np.ndarray  # (C, TASTE_DIM) float64 taste direction of the category
    category_base: np.ndarray  # (C,) float64 preference shared by all shoppers
    complement: np.ndarray  # (C,) int64 complement category
    impulse_categories: np.ndarray  # (K,) int64 category indices for the checkout surface
    hour_category_effect: np.ndarray  # (24, C) float64 preference offset by local hour
    weekend_category_effect: np.ndarray  # (C,) float64 preference offset on weekends
    month_category_effect: np.ndarray  # (12, C) float64 preference offset by month
    city_category_effect: np.ndarray  # (num_cities, C) float64 preference offset by city
    store_category_effect: np.ndarray  # (S, C) float64 assortment depth of each category
    in_assortment: np.ndarray  # (S, P) bool
    assortment_start: np.ndarray  # (S + 1,) int64 offsets into the flattened assortment
    assortment_product: np.ndarray  # (A,) int64 product index of each assortment entry
    assortment_cumulative: np.ndarray  # (A + 1,) float64 running sum of popularity, from 0
    store_category_start: np.ndarray  # (S, C + 1) int64 flattened offsets of each category
    surface_category_effect: np.ndarray  # (len(SURFACES), C) float64 cart logit offsets
    user_city: np.ndarray  # (U,) int64
    user_stores: np.ndarray  # (U, 2) int64 main and second store
    user_rate: np.ndarray  # (U,) float64 mean sessions per day
    user_start_day: np.ndarray  # (U,) int64 first active day
    user_category_affinity: np.ndarray  # (U, C) float64 static category preference
    taste_mean: np.ndarray  # (TASTE_DIM,) float64 population mean of the tastes
    user_taste_mean: np.ndarray  # (U, TASTE_DIM) float64 the mean of the city of each shopper
    initial_taste: np.ndarray  # (U, TASTE_DIM) float64 taste on day 0


def build_world(size: DemoSize, rng: np.random.Generator) -> World:
    """Draw cities, stores, products and shoppers of one demo data set."""
    num_categories = len(CATEGORIES)
    city_names = [name for name, _ in CITIES[: size.num_cities]]
    city_share = np.array([share for _, share in CITIES[: size.num_cities]])
    city_share = city_share / city_share.sum()

    store_city = _allocate_stores(size.num_stores, city_share, rng)

    # Products: category blocks, Zipf popularity over a random rank order, and taste vectors
    # built from the name tokens, so that names carry part of the taste, plus noise.
    category_share = np.array([category.share for category in CATEGORIES])
    category_counts = _largest_remainder(category_share / category_share.sum(), size.num_products)
    product_category = np.repeat(np.arange(num_categories), category_counts)
    category_start = np.concatenate([[0], np.cumsum(category_counts)])

    ranks = rng.permutation(size.num_products) + 1
    popularity = ranks.astype(np.float64) ** -0.9
    popularity /= popularity.sum()
    log_popularity = np.log(popularity)
    pop_z = (log_popularity - log_popularity.mean()) / log_popularity.std()

    category_vector = rng.normal(0.0, 1.0, (num_categories, TASTE_DIM))
    names, token_vector = _draw_names(product_category, rng)
    product_vector = token_vector + rng.normal(
        0.0, PRODUCT_NOISE_STD, (size.num_products, TASTE_DIM)
    )
    # Categories bought often (short cycles) are preferred by everyone: dairy over spices.
    category_cycle = np.array([category.cycle_days for category in CATEGORIES])
    category_base = CATEGORY_BASE_WEIGHT * np.log(np.median(category_cycle) / category_cycle)
    product_cycle = category_cycle[product_category] * rng.lognormal(0.0, 0.35, size.num_products)

    names_to_index = {category.name: index for index, category in enumerate(CATEGORIES)}
    complement = np.array([names_to_index[category.complement] for category in CATEGORIES])
    impulse = np.flatnonzero([category.impulse for category in CATEGORIES])

    store_category_effect = rng.normal(0.0, STORE_CATEGORY_STD, (size.num_stores, num_categories))
    in_assortment = _draw_assortments(
        store_city, product_category, pop_z, store_category_effect, rng
    )
    assortment_start, assortment_product, cumulative, store_category_start = _flatten_assortments(
        in_assortment, popularity, category_start
    )

    surface_category_effect = rng.normal(0.0, 0.35, (len(SURFACES), num_categories))

    # Shoppers: a city, a main and a second store in it, an activity rate, a start day, a static
    # category affinity (niche categories strongly negative for most shoppers) and a taste.
    user_city = rng.choice(size.num_cities, size.num_users, p=city_share)
    user_stores = _draw_user_stores(user_city, store_city, rng)
    user_rate = size.sessions_per_day * rng.lognormal(-0.18, 0.6, size.num_users)
    late = rng.random(size.num_users) < 0.25
    user_start_day = np.where(late, rng.integers(0, int(size.num_days * 0.7), size.num_users), 0)

    affinity = rng.normal(0.0, CATEGORY_AFFINITY_STD, (size.num_users, num_categories))
    niche_share = np.array([category.niche_share for category in CATEGORIES])
    outside_niche = rng.random((size.num_users, num_categories)) >= niche_share
    affinity = np.where(outside_niche, affinity - NICHE_PENALTY, affinity)

    # Cities differ in category preference and in the mean taste of their shoppers.
    city_category_effect = rng.normal(0.0, CITY_CATEGORY_STD, (size.num_cities, num_categories))
    city_taste_shift = rng.normal(0.0, CITY_TASTE_STD, (size.num_cities, TASTE_DIM))
    taste_mean = rng.normal(0.0, TASTE_MEAN_STD, TASTE_DIM)
    user_taste_mean = taste_mean + city_taste_shift[user_city]
    initial_taste = user_taste_mean + rng.normal(0.0, TASTE_STD, (size.num_users, TASTE_DIM))
    hour_effect, weekend_effect, month_effect = _time_category_effects()

    return World(
        city_names=city_names,
        store_city=store_city,
        product_category=product_category,
        category_start=category_start,
        product_popularity=popularity,
        product_pop_z=pop_z,
        product_vector=product_vector,
        product_cycle=product_cycle,
        product_names=names,
        category_vector=category_vector,
        category_base=category_base,
        complement=complement,
        impulse_categories=impulse,
        hour_category_effect=hour_effect,
        weekend_category_effect=weekend_effect,
        month_category_effect=month_effect,
        city_category_effect=city_category_effect,
        store_category_effect=store_category_effect,
        in_assortment=in_assortment,
        assortment_start=assortment_start,
        assortment_product=assortment_product,
        assortment_cumulative=cumulative,
        store_category_start=store_category_start,
        surface_category_effect=surface_category_effect,
        user_city=user_city,
        user_stores=user_stores,
        user_rate=user_rate,
        user_start_day=user_start_day,
        user_category_affinity=affinity,
        taste_mean=taste_mean,
        user_taste_mean=user_taste_mean,
        initial_taste=initial_taste,
    )


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Split `total` into integer counts proportional to `shares`, each at least 1."""
    raw = shares * (total - len(shares))
    counts = np.floor(raw).astype(np.int64) + 1
    remainder = total - counts.sum()
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    counts[order[:remainder]] += 1
    return counts


def _allocate_stores(num_stores: int, city_share: np.ndarray, rng: np.random.Generator):
    """Return the (S,) city index of each store. Every city gets at least one store."""
    counts = _largest_remainder(city_share, num_stores)
    return rng.permutation(np.repeat(np.arange(len(city_share)), counts))


def _time_category_effects() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build the (24, C) hourly, (C,) weekend and (12, C) monthly category preference offsets."""
    names = [category.name for category in CATEGORIES]
    daypart = np.array([DAYPART_PREFERENCE.get(name, (0.0,) * 4) for name in names]).T
    daypart_of_hour = np.empty(24, dtype=np.int64)
    for index, (start, end) in enumerate(DAYPART_HOURS):
        daypart_of_hour[np.arange(start, end) % 24] = index
    weekend = np.array([WEEKEND_PREFERENCE.get(name, 0.0) for name in names])
    season = np.array([SEASON_PREFERENCE.get(name, (0.0, 0.0)) for name in names])
    month = np.zeros((12, len(names)))
    month[list(SUMMER_MONTHS)] = season[:, 0]
    month[list(WINTER_MONTHS)] = season[:, 1]
    return daypart[daypart_of_hour], weekend, month


def _draw_names(
    product_category: np.ndarray, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """Build product names from category tokens and their (P, TASTE_DIM) token vectors.

    A name is "<noun> <descriptor> «<brand>», <pack>". The noun, descriptor and brand each add
    a vector to the product's taste, so products that share those tokens are also close in
    taste. Pack sizes carry no taste.
    """
    num_products = len(product_category)
    names = np.empty(num_products, dtype=object)
    token_vector = np.zeros((num_products, TASTE_DIM))
    for index, category in enumerate(CATEGORIES):
        members = np.flatnonzero(product_category == index)
        count = len(members)
        noun = rng.integers(0, len(category.nouns), count)
        descriptor = rng.integers(0, len(category.descriptors), count)
        brand = rng.integers(0, len(category.brands), count)
        pack = rng.integers(0, len(category.packs), count)
        noun_vector = rng.normal(0.0, NOUN_VECTOR_STD, (len(category.nouns), TASTE_DIM))
        brand_vector = rng.normal(0.0, BRAND_VECTOR_STD, (len(category.brands), TASTE_DIM))
        descriptor_vector = rng.normal(
            0.0, DESCRIPTOR_VECTOR_STD, (len(category.descriptors), TASTE_DIM)
        )
        token_vector[members] = (
            noun_vector[noun] + brand_vector[brand] + descriptor_vector[descriptor]
        )
        nouns = np.array(category.nouns, dtype=object)
        descriptors = np.array(category.descriptors, dtype=object)
        brands = np.array(category.brands, dtype=object)
        packs = np.array(category.packs, dtype=object)
        names[members] = (
            nouns[noun] + " " + descriptors[descriptor] + " «" + brands[brand] + "», " + packs[pack]
        )
    return names.tolist(), token_vector


def _draw_assortments(
    store_city: np.ndarray,
    product_category: np.ndarray,
    pop_z: np.ndarray,
    store_category_effect: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw the (S, P) bool assortment matrix.

    A store carries a product with probability sigmoid(logit(fill) + 1.2 pop_z + store x
    category depth + city x product regional offset), so popular products are carried more
    often, stores specialize in some categories and the stores of one city carry similar
    ranges. Every product is carried by at least one store, so every product can be shown.
    """
    num_stores, num_products = len(store_city), len(pop_z)
    num_cities = int(store_city.max()) + 1
    store_fill = rng.uniform(0.35, 0.85, num_stores)
    city_product_effect = rng.normal(0.0, CITY_PRODUCT_STD, (num_cities, num_products))
    logit = (
        np.log(store_fill / (1.0 - store_fill))[:, None].astype(np.float32)
        + (1.2 * pop_z).astype(np.float32)[None, :]
        + store_category_effect.astype(np.float32)[:, product_category]
        + city_product_effect.astype(np.float32)[store_city]
    )
    threshold = 1.0 / (1.0 + np.exp(-logit))
    del logit
    in_assortment = rng.random((num_stores, num_products), dtype=np.float32) < threshold
    orphans = np.flatnonzero(~in_assortment.any(axis=0))
    in_assortment[rng.integers(0, num_stores, len(orphans)), orphans] = True
    return in_assortment


def _flatten_assortments(
    in_assortment: np.ndarray, popularity: np.ndarray, category_start: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flatten the assortments for range sampling.

    Returns (S + 1,) store offsets, (A,) product indices, (A + 1,) running popularity sums
    starting at 0 and (S, C + 1) offsets of each category block inside each store.
    """
    stores, products = np.nonzero(in_assortment)  # row-major: by store, then by product
    counts = np.bincount(stores, minlength=in_assortment.shape[0])
    assortment_start = np.concatenate([[0], np.cumsum(counts)])
    cumulative = np.concatenate([[0.0], np.cumsum(popularity[products])])

    # Offset of the first product >= category_start[c] inside each store's block.
    num_stores = in_assortment.shape[0]
    keys = stores.astype(np.int64) * (len(popularity) + 1) + products
    boundaries = np.arange(num_stores)[:, None] * (len(popularity) + 1) + category_start[None, :]
    store_category_start = np.searchsorted(keys, boundaries.ravel()).reshape(boundaries.shape)
    return assortment_start, products.astype(np.int64), cumulative, store_category_start


def _draw_user_stores(
    user_city: np.ndarray, store_city: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw a (U, 2) main and second store for each shopper among the stores of their city."""
    order = np.argsort(store_city, kind="stable")
    city_counts = np.bincount(store_city, minlength=user_city.max() + 1)
    city_first = np.concatenate([[0], np.cumsum(city_counts)])[user_city]
    picks = np.floor(rng.random((len(user_city), 2)) * city_counts[user_city][:, None])
    return order[city_first[:, None] + picks.astype(np.int64)]
