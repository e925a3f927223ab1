"""The three periods of the CatBoost stage and the guard that keeps them apart.

Period A trains the transformer, period B trains CatBoost and period C evaluates it. The
transformer score is a CatBoost feature, so a transformer that saw any event of B or C would
carry their targets into the feature. `check_transformer_periods` fails loudly in that case.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from cartformer.config import DAY_SECONDS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Periods:
    """Period boundaries in unix seconds.

    A: t <= a_end. B: a_end < t <= b_end. C: b_end < t <= c_end.
    """

    a_end: int
    b_end: int
    c_end: int

    @classmethod
    def from_max_timestamp(cls, t_max: int, period_days: float) -> Periods:
        """Place C in the last `period_days` up to `t_max` and B in the `period_days` before."""
        length = round(period_days * DAY_SECONDS)
        return cls(a_end=int(t_max) - 2 * length, b_end=int(t_max) - length, c_end=int(t_max))

    def period_expr(self, timestamp: str = "timestamp") -> pl.Expr:
        """Return a String expression: "A", "B" or "C"."""
        t = pl.col(timestamp)
        return (
            pl.when(t <= self.a_end)
            .then(pl.lit("A"))
            .when(t <= self.b_end)
            .then(pl.lit("B"))
            .otherwise(pl.lit("C"))
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the boundaries in unix seconds and as ISO 8601 UTC times."""
        values: dict[str, Any] = {}
        for name, seconds in asdict(self).items():
            values[name] = seconds
            values[f"{name}_iso"] = iso_time(seconds)
        return values


def iso_time(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()


class LeakError(ValueError):
    """The transformer saw events of the periods that train or evaluate CatBoost."""


def check_transformer_periods(run_dir: str | Path, a_end: int) -> int:
    """Raise `LeakError` unless every event the run's transformer was trained on is in period A.

    The run's prepared data records what its training used. `meta.json` stores the latest
    timestamp of the whole input file (`split.valid_end`), and `events.parquet` and
    `requests.parquet` contain the positive events and the request groups. Each of the three
    must end at or before `a_end`.

    Returns:
        The latest timestamp the transformer saw, unix seconds.

    NOTE: the check trusts that the run's checkpoints were trained on its current prepared
    data. The pipeline retrains a stage whose prepared data changed, but a checkpoint copied
    in by hand is not checked.
    """
    prepared = Path(run_dir) / "prepared"
    meta_path = prepared / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found; the leak check needs the transformer run's prepared data"
        )
    meta = json.loads(meta_path.read_text())
    latest: dict[str, int] = {
        "input file (meta.json split.valid_end)": int(meta["split"]["valid_end"])
    }
    for name in ("events", "requests"):
        path = prepared / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; prepare the transformer run again")
        value = pl.scan_parquet(path).select(pl.col("timestamp").max()).collect().item()
        if value is not None:
            latest[f"prepared/{name}.parquet"] = int(value)
    source, seen = max(latest.items(), key=lambda item: item[1])
    if seen > a_end:
        raise LeakError(
            f"the transformer of {run_dir} saw events up to {iso_time(seen)} ({source}), but "
            f"CatBoost trains and evaluates on events after {iso_time(a_end)}; its score would "
            "leak their targets, so train the transformer only on events up to that time"
        )
    logger.info(
        "leak check passed: the transformer saw events up to %s, period A ends %s",
        iso_time(seen),
        iso_time(a_end),
    )
    return seen


def write_period_a(data_path: Path, output: Path, a_end: int) -> bool:
    """Write the rows of `data_path` with timestamp <= `a_end` to `output`.

    The file is kept when a marker beside it shows that it was cut from the same input file
    (path, size and modification time) at the same `a_end`. Keeping it keeps its modification
    time, so the transformer run reuses its prepared data and checkpoints.

    Returns:
        True when the file was written, False when the existing one was kept.
    """
    stat = data_path.stat()
    marker = {
        "source": str(data_path.resolve()),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "a_end": a_end,
    }
    marker_path = output.with_suffix(".source.json")
    unchanged = marker_path.is_file() and json.loads(marker_path.read_text()) == marker
    if output.is_file() and unchanged:
        logger.info("reusing the period A file %s", output)
        return False
    output.parent.mkdir(parents=True, exist_ok=True)
    marker_path.unlink(missing_ok=True)
    pl.scan_parquet(data_path).filter(pl.col("timestamp") <= a_end).sink_parquet(output)
    marker_path.write_text(json.dumps(marker, indent=2) + "\n")
    logger.info("wrote the period A rows of %s to %s", data_path, output)
    return True
