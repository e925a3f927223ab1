"""The day-by-day simulation of the demo data: sessions, shown lists, carts, clicks, purchases.

All sessions of the span are drawn up front. The loop then runs once per day that has sessions
and handles all of that day's requests at once with numpy, so its cost grows with the number of
requests, not with Python iterations over them. Cart probabilities depend on each shopper's
purchases before that day, which is why the days run in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cartformer.data.demo_world import SURFACES, TASTE_STD, DemoSize, World
from cartformer.data.schema import CART, CLICK, PURCHASE, VIEW

DAY_SECONDS = 24 * 60 * 60
LOCAL_UTC_OFFSET_SECONDS = 3 * 60 * 60
"""Shoppers live on Moscow time, UTC+3 all year: hours, weekdays and months are local."""
START_TIMESTAMP = 1_693_526_400 - LOCAL_UTC_OFFSET_SECONDS
"""2023-09-01 00:00:00 Moscow time (2023-08-31 21:00 UTC), the first day of the span."""

# Sessions and requests.
MAIN_STORE_SHARE = 0.8
WEEKEND_FACTOR = 1.25
MEAN_EXTRA_REQUESTS = 2.0
MAX_REQUESTS_PER_SESSION = 10
MEAN_REQUEST_GAP_SECONDS = 45.0
HOUR_WEIGHTS = np.array(
    [1, 0.5, 0.3, 0.2, 0.2, 0.4, 1, 2, 3, 4, 4, 4, 4.5, 4, 3.5, 3.5, 4, 5, 6, 6.5, 6, 5, 3.5, 2]
)
"""Relative session starts per local hour of the day."""

# Candidate pools.
POOL_SIZE = 64
POOL_STORE, POOL_CATEGORY, POOL_HISTORY, POOL_UNIFORM = 0, 1, 2, 3
RECENT_PURCHASES = 48
"""Length of the per-shopper buffer of recent purchases that history surfaces draw from."""
BROWSE_TEMPERATURE = 2.0
INTENT_TEMPERATURE = 0.7

# Taste drift: an Ornstein-Uhlenbeck random walk around the population mean.
TASTE_TIMESCALE_DAYS = 90.0

# Cart logit terms. The taste score of a product is its category preference plus the dot
# product of the shopper's taste with the product's vector.
CATEGORY_TASTE_WEIGHT = 0.6
CART_INTERCEPT = -6.5
TASTE_WEIGHT = 1.3
POPULARITY_WEIGHT = 0.3
IDIOSYNCRATIC_STD = 0.2
STORE_SALES_WEIGHT = 0.5
"""Weight of the store x category assortment depth in the cart logit: a store that stocks a
category deeply also sells it better."""
POSITION_WEIGHT = 0.4
REQUEST_INTENT_STD = 0.6
HABIT_WEIGHT = 0.1
CYCLE_KNOTS = np.array([0.0, 0.25, 0.6, 1.0, 1.6, 3.0, 6.0, 12.0])
"""Days since the last purchase divided by the product's cycle."""
CYCLE_EFFECT = np.array([-3.0, -2.0, -0.8, 0.3, 0.6, 0.3, 0.0, -0.3])
"""Cart logit offset at CYCLE_KNOTS, linear in between and constant beyond the last knot."""

# Other actions.
CLICK_GIVEN_CART = 0.4
CLICK_PER_CART_PROBABILITY = 0.2
CLICK_BASE = 0.002
EXTRA_CART_PROBABILITY = 0.25
PURCHASE_GIVEN_CART = 0.85

# Delays in seconds, as [low, high) ranges. A checkout comes after every cart row of its session:
# the last request's carts end at most 89 + 299 seconds after that request.
CLICK_DELAY_SECONDS = (1, 16)
CART_DELAY_SECONDS = (16, 90)
EXTRA_CART_DELAY_SECONDS = (5, 300)
CHECKOUT_DELAY_SECONDS = (400, 1200)


@dataclass
class Simulation:
    """Rows and oracle pairs of one simulated span, in generation order.

    E event rows and O shown (request, product) pairs. Request, position and surface are -1 on
    purchases.
    """

    user: np.ndarray  # (E,) int32
    product: np.ndarray  # (E,) int32
    store: np.ndarray  # (E,) int32
    request: np.ndarray  # (E,) int64 index into the request ids, -1 on purchases
    position: np.ndarray  # (E,) int16 slot in the request, -1 on purchases
    action: np.ndarray  # (E,) int8 action code of cartformer.data.schema
    surface: np.ndarray  # (E,) int8 index into SURFACES, -1 on purchases
    timestamp: np.ndarray  # (E,) int64 unix seconds
    num_requests: int
    oracle_request: np.ndarray  # (O,) int64
    oracle_product: np.ndarray  # (O,) int32
    oracle_probability: np.ndarray  # (O,) float64


@dataclass
class _Requests:
    """All requests of the span, ordered by day. R requests."""

    user: np.ndarray  # (R,) int64
    store: np.ndarray  # (R,) int64
    surface: np.ndarray  # (R,) int64
    size: np.ndarray  # (R,) int64 requested list length
    session: np.ndarray  # (R,) int64
    day: np.ndarray  # (R,) int64
    time: np.ndarray  # (R,) int64 unix seconds
    session_end: np.ndarray  # (num_sessions,) int64 unix seconds of the last request


class _ShopperState:
    """Purchase history and tastes, updated once per simulated day. U users, P products."""

    def __init__(self, world: World, rng: np.random.Generator) -> None:
        num_users = len(world.user_city)
        num_products = len(world.product_category)
        self.taste = world.initial_taste.copy()  # (U, TASTE_DIM)
        self.taste_day = 0
        self.purchase_count = np.zeros((num_users, num_products), dtype=np.uint16)
        self.last_purchase_day = np.full((num_users, num_products), -1, dtype=np.int16)
        self.recent = np.zeros((num_users, RECENT_PURCHASES), dtype=np.int64)
        self.recent_total = np.zeros(num_users, dtype=np.int64)
        self.taste_mean = world.user_taste_mean  # (U, TASTE_DIM) mean of the shopper's city
        self.rng = rng

    def advance_taste(self, day: int) -> None:
        """Move every taste along its random walk around its city mean, to `day`."""
        elapsed = day - self.taste_day
        if elapsed <= 0:
            return
        decay = np.exp(-elapsed / TASTE_TIMESCALE_DAYS)
        noise = self.rng.normal(0.0, TASTE_STD, self.taste.shape)
        self.taste = (
            self.taste_mean
            + decay * (self.taste - self.taste_mean)
            + np.sqrt(1.0 - decay**2) * noise
        )
        self.taste_day = day

    def record_purchases(self, day: int, user: np.ndarray, product: np.ndarray) -> None:
        """Add one day's purchases, (N,) users and (N,) products, to the history."""
        if len(user) == 0:
            return
        np.add.at(self.purchase_count, (user, product), 1)
        self.last_purchase_day[user, product] = day

        # Append to the circular buffers. A shopper with more purchases than the buffer length on
        # one day keeps only the last ones, so that no slot is written twice.
        order = np.argsort(user, kind="stable")
        user, product = user[order], product[order]
        counts = np.bincount(user, minlength=len(self.recent_total))
        first = np.concatenate([[0], np.cumsum(counts)])[user]
        rank = np.arange(len(user)) - first
        keep = rank >= counts[user] - RECENT_PURCHASES
        user, product, rank = user[keep], product[keep], rank[keep]
        slot = (self.recent_total[user] + rank) % RECENT_PURCHASES
        self.recent[user, slot] = product
        self.recent_total += counts


def simulate(size: DemoSize, world: World, rng: np.random.Generator) -> Simulation:
    """Simulate all sessions of the span and return their event rows and oracle pairs."""
    requests = _draw_requests(size, world, rng)
    state = _ShopperState(world, rng)
    pair_salt = rng.integers(0, 2**63, dtype=np.int64).astype(np.uint64)

    day_values, day_first = np.unique(requests.day, return_index=True)
    day_bounds = np.append(day_first, len(requests.day))
    parts: list[dict[str, np.ndarray]] = []
    for index, day in enumerate(day_values.tolist()):
        selected = slice(day_bounds[index], day_bounds[index + 1])
        state.advance_taste(day)
        parts.append(_simulate_day(day, selected, requests, world, state, pair_salt, rng))

    merged = {}
    for key in list(parts[0]):
        merged[key] = np.concatenate([part.pop(key) for part in parts])
    return Simulation(num_requests=len(requests.day), **merged)


def _draw_requests(size: DemoSize, world: World, rng: np.random.Generator) -> _Requests:
    """Draw every session and request of the span, ordered by day and then by user."""
    days = np.arange(size.num_days)
    weekday = (days + _weekday_of_start()) % 7
    day_factor = np.where(weekday >= 5, WEEKEND_FACTOR, 1.0)
    active = days[:, None] >= world.user_start_day[None, :]
    counts = rng.poisson(day_factor[:, None] * world.user_rate[None, :] * active)
    session_day, session_user = np.nonzero(counts)
    repeats = counts[session_day, session_user]
    session_day = np.repeat(session_day, repeats)
    session_user = np.repeat(session_user, repeats)
    num_sessions = len(session_day)

    hour = rng.choice(24, num_sessions, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    session_start = (
        START_TIMESTAMP
        + session_day * DAY_SECONDS
        + hour * 3600
        + rng.integers(0, 3600, num_sessions)
    )
    use_second = rng.random(num_sessions) >= MAIN_STORE_SHARE
    session_store = world.user_stores[session_user, use_second.astype(np.int64)]

    per_session = np.minimum(
        1 + rng.poisson(MEAN_EXTRA_REQUESTS, num_sessions), MAX_REQUESTS_PER_SESSION
    )
    session = np.repeat(np.arange(num_sessions), per_session)
    gaps = rng.exponential(MEAN_REQUEST_GAP_SECONDS, len(session)).astype(np.int64) + 1
    first = np.concatenate([[0], np.cumsum(per_session)[:-1]])
    gaps[first] = 0
    running = np.cumsum(gaps)
    offset = running - running[first][session]
    time = session_start[session] + offset
    session_end = session_start + (running[first + per_session - 1] - running[first])

    share = np.array([surface.share for surface in SURFACES])
    surface = rng.choice(len(SURFACES), len(session), p=share / share.sum())
    min_size = np.array([s.min_size for s in SURFACES])[surface]
    max_size = np.array([s.max_size for s in SURFACES])[surface]
    list_size = rng.integers(min_size, max_size + 1)

    return _Requests(
        user=session_user[session],
        store=session_store[session],
        surface=surface,
        size=list_size,
        session=session,
        day=session_day[session],
        time=time,
        session_end=session_end,
    )


def _weekday_of_start() -> int:
    """Local weekday of START_TIMESTAMP, Monday = 0 (1970-01-01 was a Thursday)."""
    return ((START_TIMESTAMP + LOCAL_UTC_OFFSET_SECONDS) // DAY_SECONDS + 3) % 7


def _simulate_day(
    day: int,
    selected: slice,
    requests: _Requests,
    world: World,
    state: _ShopperState,
    pair_salt: np.uint64,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Build, show and react to the lists of one day's R requests, and return its rows."""
    request_index = np.arange(len(requests.day))[selected]
    user = requests.user[selected]
    surface = requests.surface[selected]
    taste = state.taste[user]  # (R, TASTE_DIM)
    preference = category_preference(user, taste, requests.time[selected], world)  # (R, C)

    shown = _show_lists(
        user,
        requests.store[selected],
        surface,
        requests.size[selected],
        taste,
        preference,
        world,
        state,
        rng,
    )
    row, position, product, taste_score = shown
    shown_user = user[row]
    shown_surface = surface[row]
    shown_category = world.product_category[product]
    shown_store = requests.store[selected][row]

    # The true cart probability of every shown item.
    intent = rng.normal(0.0, REQUEST_INTENT_STD, len(user))
    cart_offset = np.array([s.cart_offset for s in SURFACES])
    logit = (
        CART_INTERCEPT
        + cart_offset[shown_surface]
        + world.surface_category_effect[shown_surface, shown_category]
        + STORE_SALES_WEIGHT * world.store_category_effect[shown_store, shown_category]
        + TASTE_WEIGHT * taste_score
        + POPULARITY_WEIGHT * world.product_pop_z[product]
        + IDIOSYNCRATIC_STD * _pair_noise(shown_user, product, pair_salt)
        + _repeat_effect(day, shown_user, product, world, state)
        - POSITION_WEIGHT * np.log1p(position)
        + intent[row]
    )
    probability = 1.0 / (1.0 + np.exp(-logit))
    return _draw_actions(
        day, request_index[row], position, product, probability, requests, world, state, rng
    )


def _show_lists(
    user: np.ndarray,
    store: np.ndarray,
    surface: np.ndarray,
    size: np.ndarray,
    taste: np.ndarray,
    preference: np.ndarray,
    world: World,
    state: _ShopperState,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fill the lists of R requests and return their N shown items.

    Each pool is ordered by the surface's ranking score, and the first `size` distinct products
    that the store carries are shown. Returns (N,) request rows, (N,) positions, (N,) products
    and (N,) taste scores (category preference plus taste times product vector).
    """
    category = _request_categories(user, store, surface, preference, world, state, rng)
    pool = _draw_pools(user, store, surface, category, world, state, rng)  # (R, POOL_SIZE)
    pool = np.sort(pool, axis=1)
    valid = world.in_assortment[store[:, None], pool]
    valid[:, 1:] &= pool[:, 1:] != pool[:, :-1]

    rows = np.arange(len(user))[:, None]
    taste_score = preference[rows, world.product_category[pool]]
    taste_score += np.einsum("rd,rkd->rk", taste, world.product_vector[pool])
    bought = state.purchase_count[user[:, None], pool] > 0
    weights = np.array([s.rank_weights for s in SURFACES])[surface]  # (R, 4)
    gumbel = -np.log(-np.log(rng.random(pool.shape)))
    rank_score = (
        weights[:, 0:1] * taste_score
        + weights[:, 1:2] * world.product_pop_z[pool]
        + weights[:, 2:3] * bought
        + weights[:, 3:4] * gumbel
    )
    rank_score = np.where(valid, rank_score, -np.inf)
    order = np.argsort(-rank_score, axis=1, kind="stable")

    list_size = np.minimum(size, valid.sum(axis=1))
    shown_row, shown_position = np.nonzero(np.arange(POOL_SIZE)[None, :] < list_size[:, None])
    pool_slot = order[shown_row, shown_position]
    return (
        shown_row,
        shown_position,
        pool[shown_row, pool_slot],
        taste_score[shown_row, pool_slot],
    )


def category_preference(
    user: np.ndarray, taste: np.ndarray, time: np.ndarray, world: World
) -> np.ndarray:
    """Return the (R, C) category preference of R shoppers with (R, TASTE_DIM) tastes.

    The sum of the shared category base, the shopper's static affinity, the city's offset, the
    offsets of the local hour, weekend and month of the (R,) unix-second times `time`, and the
    part of the taste along the category's direction. That last part is measured from the
    population mean of the tastes, so it includes the city's taste shift but no category is
    liked by everyone by chance.
    """
    drift = (taste - world.taste_mean) @ world.category_vector.T
    hour, weekend, month = local_calendar(time)
    return (
        world.category_base
        + world.user_category_affinity[user]
        + world.city_category_effect[world.user_city[user]]
        + world.hour_category_effect[hour]
        + weekend[:, None] * world.weekend_category_effect
        + world.month_category_effect[month]
        + CATEGORY_TASTE_WEIGHT * drift
    )


def local_calendar(time: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the local (R,) hour 0..23, (R,) weekend flag and (R,) month 0..11 of unix seconds."""
    local = time + LOCAL_UTC_OFFSET_SECONDS
    hour = (local // 3600) % 24
    weekend = (local // DAY_SECONDS + 3) % 7 >= 5  # 1970-01-01 was a Thursday
    month = local.astype("datetime64[s]").astype("datetime64[M]").astype(np.int64) % 12
    return hour, weekend, month


def _request_categories(
    user: np.ndarray,
    store: np.ndarray,
    surface: np.ndarray,
    preference: np.ndarray,
    world: World,
    state: _ShopperState,
    rng: np.random.Generator,
) -> np.ndarray:
    """Pick the (R,) category of each request according to its surface's category mode.

    `preference` is the (R, C) category preference of each request's shopper.
    """
    num_requests = len(user)
    gumbel = -np.log(-np.log(rng.random(preference.shape)))
    browse = np.argmax(preference / BROWSE_TEMPERATURE + gumbel, axis=1)
    intent = np.argmax(preference / INTENT_TEMPERATURE + gumbel, axis=1)

    # The anchor is a recent purchase, or a popular product of the store for new shoppers.
    filled = np.minimum(state.recent_total[user], RECENT_PURCHASES)
    pick = np.floor(rng.random(num_requests) * np.maximum(filled, 1)).astype(np.int64)
    anchor = np.where(
        filled > 0,
        state.recent[user, pick],
        _sample_by_popularity(
            world.assortment_start[store], world.assortment_start[store + 1], world, rng
        ),
    )
    anchor_category = world.product_category[anchor]

    impulse_gumbel = gumbel[:, : len(world.impulse_categories)]
    impulse_preference = preference[:, world.impulse_categories] + impulse_gumbel
    impulse = world.impulse_categories[np.argmax(impulse_preference, axis=1)]

    mode = np.array([s.category_mode for s in SURFACES])[surface]
    return np.select(
        [mode == "intent", mode == "anchor", mode == "complement", mode == "impulse"],
        [intent, anchor_category, world.complement[anchor_category], impulse],
        default=browse,
    )


def _draw_pools(
    user: np.ndarray,
    store: np.ndarray,
    surface: np.ndarray,
    category: np.ndarray,
    world: World,
    state: _ShopperState,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw an (R, POOL_SIZE) product pool per request from its surface's source mix.

    Products may repeat inside a pool, and history products may be missing from the store.
    """
    num_requests = len(user)
    shape = (num_requests, POOL_SIZE)
    mix = np.cumsum(np.array([s.pool_mix for s in SURFACES]), axis=1)
    mix /= mix[:, -1:]
    source = (rng.random(shape)[:, :, None] > mix[surface][:, None, :]).sum(axis=2)

    store_low = np.broadcast_to(world.assortment_start[store][:, None], shape)
    store_high = np.broadcast_to(world.assortment_start[store + 1][:, None], shape)
    category_low = world.store_category_start[store, category][:, None]
    category_high = world.store_category_start[store, category + 1][:, None]
    empty = category_high <= category_low
    low = np.where(
        (source == POOL_CATEGORY) & ~empty, np.broadcast_to(category_low, shape), store_low
    )
    high = np.where(
        (source == POOL_CATEGORY) & ~empty, np.broadcast_to(category_high, shape), store_high
    )
    pool = _sample_by_popularity(low, high, world, rng)

    uniform = source == POOL_UNIFORM
    uniform_entry = store_low + np.floor(rng.random(shape) * (store_high - store_low)).astype(
        np.int64
    )
    pool = np.where(uniform, world.assortment_product[uniform_entry], pool)

    filled = np.minimum(state.recent_total[user], RECENT_PURCHASES)[:, None]
    pick = np.floor(rng.random(shape) * np.maximum(filled, 1)).astype(np.int64)
    recent = state.recent[user[:, None], pick]
    return np.where((source == POOL_HISTORY) & (filled > 0), recent, pool)


def _sample_by_popularity(
    low: np.ndarray, high: np.ndarray, world: World, rng: np.random.Generator
) -> np.ndarray:
    """Draw one product per element from flattened assortment entries [low, high), by popularity.

    `low` and `high` have any equal shapes, with high > low; the result has the same shape.
    """
    cumulative = world.assortment_cumulative
    start = cumulative[low]
    target = start + rng.random(np.shape(low)) * (cumulative[high] - start)
    entry = np.searchsorted(cumulative, target, side="right") - 1
    entry = np.clip(entry, low, high - 1)
    return world.assortment_product[entry]


def _pair_noise(user: np.ndarray, product: np.ndarray, salt: np.uint64) -> np.ndarray:
    """Return a fixed standard normal value per (user, product) pair, from a hash of both.

    The value is the same every time the pair is shown, so it acts as a personal liking that
    only the pair's own history reveals.
    """
    key = (user.astype(np.uint64) << np.uint64(32)) ^ product.astype(np.uint64) ^ salt
    first = splitmix64(key)
    second = splitmix64(first)
    scale = 1.0 / 2.0**53
    uniform_1 = ((first >> np.uint64(11)).astype(np.float64) + 0.5) * scale
    uniform_2 = (second >> np.uint64(11)).astype(np.float64) * scale
    return np.sqrt(-2.0 * np.log(uniform_1)) * np.cos(2.0 * np.pi * uniform_2)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """Apply the SplitMix64 finalizer to (N,) uint64 values. Arithmetic wraps modulo 2**64."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _repeat_effect(
    day: int, user: np.ndarray, product: np.ndarray, world: World, state: _ShopperState
) -> np.ndarray:
    """Return the (N,) cart logit offset from the shopper's earlier purchases of each product.

    Zero for products never bought. Otherwise a habit term that grows with the purchase count,
    plus the cycle term: negative right after a purchase, positive once the product's cycle has
    elapsed, fading for purchases many cycles ago.
    """
    count = state.purchase_count[user, product].astype(np.float64)
    last = state.last_purchase_day[user, product].astype(np.float64)
    elapsed_cycles = (day - last) / world.product_cycle[product]
    cycle = np.interp(elapsed_cycles, CYCLE_KNOTS, CYCLE_EFFECT)
    return np.where(count > 0, HABIT_WEIGHT * np.log1p(count) + cycle, 0.0)


def _draw_actions(
    day: int,
    request: np.ndarray,
    position: np.ndarray,
    product: np.ndarray,
    probability: np.ndarray,
    requests: _Requests,
    world: World,
    state: _ShopperState,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Draw views, clicks, carts and purchases of N shown items and record the purchases."""
    num_shown = len(request)
    user = requests.user[request]
    store = requests.store[request]
    surface = requests.surface[request]
    time = requests.time[request]

    cart = rng.random(num_shown) < probability
    click_probability = np.where(
        cart, CLICK_GIVEN_CART, CLICK_BASE + CLICK_PER_CART_PROBABILITY * probability
    )
    click = rng.random(num_shown) < click_probability
    extra_cart = cart & (rng.random(num_shown) < EXTRA_CART_PROBABILITY)

    click_time = time + rng.integers(*CLICK_DELAY_SECONDS, num_shown)
    cart_time = time + rng.integers(*CART_DELAY_SECONDS, num_shown)
    extra_time = cart_time + rng.integers(*EXTRA_CART_DELAY_SECONDS, num_shown)

    # One purchase per carted product and session, at checkout after the session's last request.
    session = requests.session[request[cart]]
    key = np.unique(session * np.int64(len(world.product_category)) + product[cart])
    purchase_session = key // len(world.product_category)
    purchase_product = key % len(world.product_category)
    bought = rng.random(len(key)) < PURCHASE_GIVEN_CART
    purchase_session = purchase_session[bought]
    purchase_product = purchase_product[bought]
    first_request = np.searchsorted(requests.session, purchase_session)
    purchase_user = requests.user[first_request]
    purchase_store = requests.store[first_request]
    purchase_time = requests.session_end[purchase_session] + rng.integers(
        *CHECKOUT_DELAY_SECONDS, len(purchase_session)
    )
    state.record_purchases(day, purchase_user, purchase_product)

    shown_parts = [
        (np.ones(num_shown, bool), VIEW, time),
        (click, CLICK, click_time),
        (cart, CART, cart_time),
        (extra_cart, CART, extra_time),
    ]
    rows: dict[str, list[np.ndarray]] = {key: [] for key in _ROW_DTYPES}
    for mask, action, action_time in shown_parts:
        rows["user"].append(user[mask])
        rows["product"].append(product[mask])
        rows["store"].append(store[mask])
        rows["request"].append(request[mask])
        rows["position"].append(position[mask])
        rows["action"].append(np.full(int(mask.sum()), action))
        rows["surface"].append(surface[mask])
        rows["timestamp"].append(action_time[mask])
    num_purchases = len(purchase_product)
    rows["user"].append(purchase_user)
    rows["product"].append(purchase_product)
    rows["store"].append(purchase_store)
    rows["request"].append(np.full(num_purchases, -1))
    rows["position"].append(np.full(num_purchases, -1))
    rows["action"].append(np.full(num_purchases, PURCHASE))
    rows["surface"].append(np.full(num_purchases, -1))
    rows["timestamp"].append(purchase_time)

    merged = {
        key: np.concatenate(parts).astype(_ROW_DTYPES[key], copy=False)
        for key, parts in rows.items()
    }
    merged["oracle_request"] = request
    merged["oracle_product"] = product.astype(np.int32)
    merged["oracle_probability"] = probability
    return merged


_ROW_DTYPES = {
    "user": np.int32,
    "product": np.int32,
    "store": np.int32,
    "request": np.int64,
    "position": np.int16,
    "action": np.int8,
    "surface": np.int8,
    "timestamp": np.int64,
}
