import json

import numpy as np
import polars as pl
import pytest
import torch

from cartformer.config import RunConfig
from cartformer.data.dataset import FinetuneDataset
from cartformer.data.encoding import NO_SURFACE, IdMapping
from cartformer.data.schema import POSITIVE_ACTIONS
from cartformer.evaluation.baselines import read_train_end
from cartformer.inference.score import (
    best_variant,
    load_scorer,
    lowest_logit,
    read_score_metadata,
    score_frame,
    score_requests,
    write_scores,
)
from cartformer.pipeline import make_loader, predict_finetune

DAY = 24 * 60 * 60


@pytest.fixture(scope="module")
def scorer(scoring_run):
    return load_scorer(scoring_run, "scratch", "cpu")


def write(frame, path):
    frame.write_parquet(path)
    return path


def validation_requests(run):
    """Decode finetune_valid.parquet to request rows, one per candidate in sample order."""
    prepared = run / "prepared"
    valid = pl.read_parquet(prepared / "finetune_valid.parquet")
    requests = valid.select(
        "user", "request_id", "request_timestamp", "request_source", "request_size"
    ).explode("request_id", "request_timestamp", "request_source", "request_size")
    rows = requests.select(
        pl.col("user").repeat_by("request_size").explode(),
        pl.col("request_id").repeat_by("request_size").explode(),
        pl.col("request_timestamp").repeat_by("request_size").explode().alias("timestamp"),
        pl.col("request_source").repeat_by("request_size").explode().alias("source"),
    ).with_columns(valid["candidate_product"].explode().alias("product"))
    mappings = prepared / "mappings"
    surface = IdMapping.load(mappings, "source").decode(rows["source"])
    return pl.DataFrame(
        {
            "user_id": IdMapping.load(mappings, "user").decode(rows["user"]),
            "request_id": rows["request_id"],
            "product_id": IdMapping.load(mappings, "product").decode(rows["product"]),
            "timestamp": rows["timestamp"],
            "source_type": surface.replace(NO_SURFACE, None),
        }
    )


def test_scores_match_finetune_validation(scoring_run, scorer, demo_events, tmp_path):
    train_end = read_train_end(scoring_run / "prepared")
    log = write(demo_events.filter(pl.col("timestamp") <= train_end), tmp_path / "log.parquet")
    requests = validation_requests(scoring_run)

    result = score_frame(scorer, requests, log)

    cfg = RunConfig.load(scoring_run / "config.json")
    loader = make_loader(
        FinetuneDataset(scoring_run / "prepared" / "finetune_valid.parquet"), cfg.finetune, False
    )
    logits, _, _, _ = predict_finetune(scorer.model, loader, torch.device("cpu"))
    assert result.counts["rows_fallback"] == 0
    np.testing.assert_allclose(result.scores["score"].to_numpy(), logits, rtol=1e-5, atol=1e-5)


def reference_scores(scorer, requests, events, lag_days=0.0):
    """Plain reference: score each request alone from the last `max_history` positive events
    before its cutoff. Returns one score per distinct (user, request, product), keyed."""
    products, sources = scorer.products, scorer.sources
    positive = (
        events.with_columns(
            pl.col("action_type")
            .replace_strict(
                {"AT_View": 0, "AT_CartUpdate": 1, "AT_Click": 2, "AT_Purchase": 3},
                return_dtype=pl.Int8,
            )
            .alias("action")
        )
        .filter(pl.col("action").is_in(POSITIVE_ACTIONS))
        .select(
            "user_id",
            products.encode_expr("product_id").alias("product"),
            sources.encode_expr("source_type").alias("source"),
            "action",
            "timestamp",
        )
        .sort(["user_id", "timestamp", "action", "product", "source"], maintain_order=True)
    )
    by_user = positive.partition_by("user_id", as_dict=True)
    keyed = {}
    groups = requests.group_by("user_id", "request_id").agg(
        pl.col("timestamp").min(),
        pl.col("source_type").first(),
        pl.col("product_id").unique(),
    )
    for request in groups.iter_rows(named=True):
        cutoff = (
            request["timestamp"] - 1 if lag_days == 0 else request["timestamp"] - lag_days * DAY
        )
        user_events = by_user.get((request["user_id"],))
        if user_events is None:
            continue
        history = user_events.filter(pl.col("timestamp") <= cutoff).tail(scorer.max_history)
        if history.height == 0:
            continue
        product_index = products.encode(pl.Series(request["product_id"], dtype=pl.UInt64))
        source_index = sources.encode(pl.Series([request["source_type"]], dtype=pl.String))
        n = history.height
        batch = {
            "history": {
                "product": torch.tensor(history["product"].to_list()),
                "source": torch.tensor(history["source"].to_list()),
                "action": torch.tensor(history["action"].to_list(), dtype=torch.int64),
                "position": torch.arange(n),
                "lengths": torch.tensor([n]),
            },
            "requests": {
                "source": torch.tensor(source_index.to_list(), dtype=torch.int64),
                "state_index": torch.tensor([n - 1]),
                "lengths": torch.tensor([len(request["product_id"])]),
                "num_requests": torch.tensor([1]),
            },
            "candidates": {"product": torch.tensor(product_index.to_list(), dtype=torch.int64)},
        }
        with torch.inference_mode():
            logits = scorer.model.score(batch).numpy()
        for product_id, value in zip(request["product_id"], logits, strict=True):
            keyed[(request["user_id"], request["request_id"], product_id)] = float(value)
    return keyed


def single_surface(requests):
    """Give every request one surface, so the reference's first surface is the request's."""
    first = requests.group_by("user_id", "request_id").agg(pl.col("source_type").first())
    return requests.drop("source_type").join(
        first, on=["user_id", "request_id"], how="left", maintain_order="left"
    )


def test_in_period_scores_match_reference(scorer, recent_requests, demo_events, scoring_run):
    # The plain reference runs the model once per request, so it checks the first 40 only.
    first_requests = recent_requests["request_id"].unique(maintain_order=True).head(40)
    requests = single_surface(
        recent_requests.filter(pl.col("request_id").is_in(first_requests.to_list()))
    )
    log = scoring_run / "demo" / "train.parquet"

    result = score_frame(scorer, requests, log, window_step=1)

    expected = reference_scores(scorer, requests, demo_events)
    keys = requests.select("user_id", "request_id", "product_id").rows()
    assert len(expected) > 20
    assert result.counts["windows"] > result.counts["users"]
    scored = result.scores["score"].to_numpy()
    for key, value in zip(keys, scored, strict=True):
        if key in expected:
            assert value == pytest.approx(expected[key], abs=1e-5), key


def test_default_windows_close_to_exact(scorer, recent_requests, scoring_run):
    log = scoring_run / "demo" / "train.parquet"
    exact = score_frame(scorer, recent_requests, log, window_step=1)
    shared = score_frame(scorer, recent_requests, log)
    assert shared.counts["windows"] < exact.counts["windows"]
    assert shared.counts["window_events"] < exact.counts["window_events"]
    assert np.isfinite(shared.scores["score"].to_numpy()).all()


def test_rows_without_action_type_kept_in_order(scoring_run, recent_requests, requests_file):
    result = score_requests(scoring_run, requests_file, variant="scratch", device="cpu")
    scores = result.scores
    assert scores.columns == ["request_id", "product_id", "index", "score"]
    assert scores.height == recent_requests.height
    assert scores["index"].to_list() == recent_requests["index"].to_list()
    assert scores["request_id"].to_list() == recent_requests["request_id"].to_list()
    assert scores["product_id"].to_list() == recent_requests["product_id"].to_list()
    assert scores["score"].null_count() == 0
    joined = recent_requests.join(scores, on="index", how="inner")
    assert joined.height == recent_requests.height
    assert (joined["request_id"] == joined["request_id_right"]).all()


def test_duplicate_rows_share_a_score(scorer, recent_requests, scoring_run):
    doubled = pl.concat([recent_requests, recent_requests.head(5)])
    result = score_frame(scorer, doubled, scoring_run / "demo" / "train.parquet")
    scores = result.scores["score"].to_numpy()
    assert result.scores.height == doubled.height
    np.testing.assert_array_equal(scores[-5:], scores[:5])


def test_without_index_column(scorer, recent_requests, scoring_run):
    result = score_frame(
        scorer, recent_requests.drop("index"), scoring_run / "demo" / "train.parquet"
    )
    assert result.scores.columns == ["request_id", "product_id", "score"]


def test_unseen_user_and_product_fall_back(scorer, recent_requests, scoring_run, tmp_path):
    first_request = recent_requests.filter(pl.col("request_id") == recent_requests["request_id"][0])
    new_user = first_request.with_columns(
        pl.lit(12345, dtype=pl.UInt64).alias("user_id"),
        pl.lit(777, dtype=pl.UInt64).alias("request_id"),
    )
    new_product = recent_requests.head(2).with_columns(
        pl.lit(999, dtype=pl.UInt64).alias("product_id")
    )
    requests = pl.concat([recent_requests, new_user, new_product])
    log = scoring_run / "demo" / "train.parquet"

    result = score_frame(scorer, requests, log)

    counts = result.counts
    assert counts["users_no_history"] == 1
    assert counts["requests_no_history"] == 1
    assert counts["rows_no_history"] == new_user.height
    assert counts["rows_unseen_product"] == 2
    assert counts["candidates_unseen_product"] == 2
    assert counts["rows_fallback"] == new_user.height + 2
    scores = result.scores["score"].to_numpy()
    model_rows = scores[: recent_requests.height]
    fallback_rows = scores[recent_requests.height :]
    assert fallback_rows.max() < model_rows.min()
    assert fallback_rows.min() >= lowest_logit(scorer.model) - 1.0

    result.metadata["requests_file"] = "requests.parquet"
    path = write_scores(result, tmp_path / "scores.parquet")
    stored = read_score_metadata(path)
    assert stored["counts"]["rows_no_history"] == new_user.height
    assert stored["counts"]["rows_unseen_product"] == 2
    assert stored["variant"] == "scratch"


def test_no_history_ranks_by_popularity(scorer, recent_requests, scoring_run):
    new_user = recent_requests.with_columns(pl.lit(12345, dtype=pl.UInt64).alias("user_id"))
    result = score_frame(scorer, new_user, scoring_run / "demo" / "train.parquet")
    scores = result.scores["score"].to_numpy()
    assert result.counts["rows_fallback"] == new_user.height
    assert np.unique(scores).size > 1


def test_lag_equals_shifted_requests(scorer, recent_requests, scoring_run):
    log = scoring_run / "demo" / "train.parquet"
    lag_days = 10
    lagged = score_frame(scorer, recent_requests, log, lag_days=lag_days)
    shifted_requests = recent_requests.with_columns(pl.col("timestamp") - lag_days * DAY + 1)
    shifted = score_frame(scorer, shifted_requests, log)
    unlagged = score_frame(scorer, recent_requests, log)
    np.testing.assert_allclose(
        lagged.scores["score"].to_numpy(), shifted.scores["score"].to_numpy(), atol=1e-6
    )
    assert not np.allclose(lagged.scores["score"].to_numpy(), unlagged.scores["score"].to_numpy())


def test_negative_lag_rejected(scorer, recent_requests, scoring_run):
    with pytest.raises(ValueError, match="--lag-days"):
        score_frame(scorer, recent_requests, scoring_run / "demo" / "train.parquet", lag_days=-1)


def test_best_variant_reads_summary(tmp_path):
    for variant in ("scratch", "pretrained-backbone"):
        stage = tmp_path / "checkpoints" / f"finetune-{variant}"
        stage.mkdir(parents=True)
        (stage / "best.safetensors").write_bytes(b"")
    summary = {
        "methods": {
            "finetune: scratch": {"kind": "model", "ndcg10": 0.4},
            "finetune: pretrained-backbone": {"kind": "model", "ndcg10": 0.5},
        }
    }
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "summary.json").write_text(json.dumps(summary))
    assert best_variant(tmp_path) == "pretrained-backbone"


def test_best_variant_reads_trainer_state(tmp_path):
    for variant, value in (("scratch", 0.6), ("pretrained-backbone-heads", 0.5)):
        stage = tmp_path / "checkpoints" / f"finetune-{variant}"
        stage.mkdir(parents=True)
        (stage / "best.safetensors").write_bytes(b"")
        (stage / "trainer_state.json").write_text(json.dumps({"best_metric": value}))
    assert best_variant(tmp_path) == "scratch"


def test_run_without_finetuned_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="cartformer finetune"):
        best_variant(tmp_path)


# --- side features -------------------------------------------------------------------------------


def with_request_context(run, requests):
    """Add the raw city_name and store_id of each validation request from the sidecar file."""
    prepared = run / "prepared"
    sidecar = pl.read_parquet(prepared / "features" / "finetune_valid.parquet")
    valid = pl.read_parquet(prepared / "finetune_valid.parquet")
    per_request = pl.DataFrame(
        {
            "request_id": valid["request_id"].explode(),
            "size": valid["request_size"].explode(),
            "city": sidecar["request_city"].explode(),
            "store": sidecar["request_store"].explode(),
        }
    )
    rows = per_request.select(
        pl.col("city").repeat_by("size").explode(), pl.col("store").repeat_by("size").explode()
    )
    mappings = prepared / "mappings"
    return requests.with_columns(
        IdMapping.load(mappings, "city").decode(rows["city"]).alias("city_name"),
        IdMapping.load(mappings, "store").decode(rows["store"]).alias("store_id"),
    )


def test_feature_scores_match_validation(feature_scoring_run, tmp_path):
    run = feature_scoring_run
    scorer = load_scorer(run, "scratch", "cpu")
    assert scorer.side_features == ("city", "store", "timestamp")
    events = pl.read_parquet(run / "demo" / "train.parquet")
    train_end = read_train_end(run / "prepared")
    log = write(events.filter(pl.col("timestamp") <= train_end), tmp_path / "log.parquet")
    requests = with_request_context(run, validation_requests(run))

    result = score_frame(scorer, requests, log)

    cfg = RunConfig.load(run / "config.json")
    dataset = FinetuneDataset(run / "prepared" / "finetune_valid.parquet", scorer.side_features)
    loader = make_loader(dataset, cfg.finetune, False)
    logits, _, _, _ = predict_finetune(scorer.model, loader, torch.device("cpu"))
    assert result.counts["rows_fallback"] == 0
    np.testing.assert_allclose(result.scores["score"].to_numpy(), logits, rtol=1e-5, atol=1e-5)


def test_feature_scores_use_request_store(feature_scoring_run, tmp_path):
    run = feature_scoring_run
    scorer = load_scorer(run, "scratch", "cpu")
    events = pl.read_parquet(run / "demo" / "train.parquet")
    requests = with_request_context(run, validation_requests(run))
    log = write(events, tmp_path / "log.parquet")
    moved = requests.with_columns(pl.lit(2**60, dtype=pl.UInt64).alias("store_id"))

    original = score_frame(scorer, requests, log).scores["score"].to_numpy()
    unseen = score_frame(scorer, moved, log)

    assert unseen.counts["rows_fallback"] == 0
    assert np.isfinite(unseen.scores["score"].to_numpy()).all()
    assert not np.allclose(unseen.scores["score"].to_numpy(), original)


def test_feature_scores_without_context_columns(feature_scoring_run, tmp_path, caplog):
    run = feature_scoring_run
    scorer = load_scorer(run, "scratch", "cpu")
    events = pl.read_parquet(run / "demo" / "train.parquet")
    log = write(events.drop("city_name", "store_id"), tmp_path / "log.parquet")
    requests = validation_requests(run).head(50)
    caplog.set_level("WARNING")

    result = score_frame(scorer, requests, log)

    assert np.isfinite(result.scores["score"].to_numpy()).all()
    assert "has no column(s) ['city_name', 'store_id']" in caplog.text


def test_feature_score_requests_reads_raw_columns(feature_scoring_run, tmp_path):
    run = feature_scoring_run
    requests = with_request_context(run, validation_requests(run))
    path = write(requests, tmp_path / "requests.parquet")
    from_file = score_requests(run, path, variant="scratch", device="cpu")
    scorer = load_scorer(run, "scratch", "cpu")
    direct = score_frame(scorer, requests, run / "demo" / "train.parquet")
    np.testing.assert_allclose(
        from_file.scores["score"].to_numpy(), direct.scores["score"].to_numpy(), atol=1e-6
    )
