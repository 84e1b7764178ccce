"""``lorakit sweep``: short trainings over a grid of settings, scored on the validation
split, to choose rank, learning rate and targets by measurement.

Every grid point trains with the same config, steps and data order but for the keys the
grid sets, into ``<output_dir>/sweep/<point>/``. Each point records what it ran with
(``point.json``: its config, the data files' digests and the scoring asked for); a point
that finished (its ``result.json`` exists) is never trained again, one that was interrupted
resumes, and a point recorded with other settings is refused, never reported as if it
had run with these.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.checkpoint import differences, file_digest
from lorakit.config import Config, ConfigError, config_to_dict, load_config, yaml_value
from lorakit.errors import InputError
from lorakit.files import atomic_file
from lorakit.train import train


POINT = "point.json"  # what a point ran with (``_settings``)


@dataclass
class Point:
    """One grid point: its directory name and the overrides that define it."""

    name: str
    overrides: list[str]


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets: ``[q,v],all-linear`` → ``["[q,v]", "all-linear"]``."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


def parse_grid(grids: list[str]) -> list[tuple[str, list]]:
    """``["lora.r=4,8", "training.lr=2e-4,1e-3"]`` → ``[("lora.r", [4, 8]), ("training.lr", [2e-4, 1e-3])]``.

    Raises:
        ConfigError: for an entry without ``=``, without values, with a value that is
            not valid YAML (a key given twice included) or given twice, for a key already
            in the grid, and for ``training.output_dir`` (the sweep sets it per point).
    """
    parsed = []
    for item in grids:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not _split_values(values):
            raise ConfigError("--grid", [f"--grid {item!r}: expected KEY=V1,V2,..., e.g. lora.r=4,8,16"])
        key = key.strip()
        try:
            values = [_value(v) for v in _split_values(values)]
        except ValueError as e:
            raise ConfigError("--grid", [f"--grid {item!r}: a value is not valid YAML ({e})"]) from None
        twice = next((json.dumps(v) for i, v in enumerate(values) if v in values[:i]), None)
        if key == "training.output_dir":  # each point's is output_dir/sweep/<point>
            problem = "the sweep sets each point's output_dir itself; choose the sweep's with --set"
        elif key in (k for k, _ in parsed):
            problem = f"{key} is already a grid key; give all its values in one --grid"
        elif twice is not None:
            problem = f"the value {twice} is given twice"
        else:
            parsed.append((key, values))
            continue
        raise ConfigError("--grid", [f"--grid {item!r}: {problem}"])
    return parsed


def _value(text: str):
    """YAML, except that ``2e-4`` is a number (YAML 1.1 wants ``2.0e-4``)."""
    value = yaml_value(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _slug(key: str, value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return f"{key.rsplit('.', 1)[-1]}={re.sub(r'[^A-Za-z0-9.+-]+', '-', text).strip('-')}"


def grid_points(grids: list[tuple[str, list]], full_finetune: bool = False, full_lr: float = 2e-5) -> list[Point]:
    """Every combination of the grid's values, plus the full fine-tuning reference if asked."""
    keys = [key for key, _ in grids]
    points = []
    for values in itertools.product(*(v for _, v in grids)):
        name = ",".join(_slug(k, v) for k, v in zip(keys, values))
        points.append(Point(name, [f"{k}={json.dumps(v)}" for k, v in zip(keys, values)]))
    if full_finetune:
        points.append(Point(f"full,lr={full_lr:g}", ["method=full", "lora=null", f"training.lr={full_lr}"]))
    # Values that read alike in a directory name ([q,v] and "q|v" are both q-v) must not share one.
    names = [p.name for p in points]
    for point in points:
        if names.count(point.name) > 1:
            point.name += "-" + hashlib.sha256(json.dumps(point.overrides).encode()).hexdigest()[:6]
    return points


def run_sweep(config: Path, overrides: list[str], grids: list[str], full_finetune: bool = False,
              full_lr: float = 2e-5, metrics: list[str] | None = None, limit: int | None = None,
              max_new_tokens: int = 32) -> list[dict]:
    """Train and score every grid point (skipping finished ones); returns one row per point."""
    from lorakit.evaluation import resolve_target, run_eval

    base = load_config(config, overrides)  # fails fast on a bad config, before any training
    root = Path(base.training.output_dir) / "sweep"
    points, digests = [], {}  # data files are hashed once, whatever the number of points
    for point in grid_points(parse_grid(grids), full_finetune, full_lr):  # every point checked before any trains
        out = root / point.name
        cfg = load_config(config, [*overrides, *point.overrides, f"training.output_dir={out}"])
        settings = _settings(cfg, metrics, limit, max_new_tokens, digests)
        _check_point(out, settings)
        points.append((point, out, cfg, settings))
    rows = []
    for point, out, cfg, settings in points:
        done = out / "result.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        if not (out / POINT).is_file():
            out.mkdir(parents=True, exist_ok=True)
            with atomic_file(out / POINT) as tmp:
                tmp.write_text(json.dumps(settings, indent=2))
        resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*"))
        start = time.perf_counter()
        result = train(cfg, resume=resume, overwrite=not resume)
        row = {"point": point.name, "overrides": point.overrides, "trainable": result.trainable,
               "seconds": time.perf_counter() - start,
               "val_loss": next((r["val_loss"] for r in reversed(result.history) if "val_loss" in r), None)}
        if metrics:
            scored = run_eval(resolve_target(str(result.adapter_dir)), metrics, limit=limit,
                              max_new_tokens=max_new_tokens)
            row.update(scored["model"])
        with atomic_file(done) as tmp:
            tmp.write_text(json.dumps(row, indent=2))
        rows.append(row)
    with atomic_file(root / "sweep.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    return rows


def _settings(cfg: Config, metrics: list[str] | None, limit: int | None, max_new_tokens: int,
              digests: dict[str, str]) -> dict:
    """What a point's result depends on: its config, its data files' contents (SHA-256,
    memoised by path in ``digests``), its scoring."""
    files = {key: getattr(cfg.data, key) for key in ("train", "validation")}
    for path in files.values():
        if path and path not in digests and Path(path).is_file():
            digests[path] = file_digest(Path(path))
    return {"config": config_to_dict(cfg),
            "data": {key: digests[path] for key, path in files.items() if path in digests},
            "scoring": {"metrics": sorted(metrics or []), "limit": limit,
                        "max_new_tokens": max_new_tokens if metrics else None}}


def _check_point(out: Path, settings: dict) -> None:
    """Refuse a point recorded with other settings than ``settings`` (or with none).

    Raises:
        InputError: naming the point and the settings that differ.
    """
    recorded = out / POINT
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        diffs = differences(before.get("config", {}), settings["config"], "then", "config.")
        diffs += [f"data.{key}: the file changed" for key in sorted(set(before.get("data", {})) | set(settings["data"]))
                  if before.get("data", {}).get(key) != settings["data"].get(key)]
        diffs += differences(before.get("scoring", {}), settings["scoring"], "then", "scoring.")
        if not diffs:
            return
        problem = f"ran with other settings ({'; '.join(diffs[:3])})"
    elif out.is_dir() and any(out.iterdir()):
        problem = f"holds a run this sweep did not record (no {POINT})"
    else:
        return
    raise InputError(f"sweep point {out} {problem}: its results would not be this sweep's. Remove {out} to run "
                     "it again, or choose another training.output_dir")


def plot_sweep(rows: list[dict], score: str, out: Path) -> Path:
    """``score`` against trainable parameters (log scale), one labelled dot per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row.get(score) is None:
            continue
        ax.scatter(row["trainable"], row[score], color="tab:red" if row["point"].startswith("full") else "tab:blue")
        ax.annotate(row["point"], (row["trainable"], row[score]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(score)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
