"""lorakit sweep: grid parsing, one row per point, resume without retraining, full FT point."""

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from lorakit.cli import app
from lorakit.config import ConfigError
from lorakit.errors import InputError
from lorakit.sweep import grid_points, parse_grid, run_sweep


def test_grid_parsing():
    grid = parse_grid(["lora.r=4,8,16", "training.lr=2e-4,1e-3", "lora.target_modules=[q,v],[q,k,v,o],all-linear"])
    assert grid == [("lora.r", [4, 8, 16]), ("training.lr", [2e-4, 1e-3]),
                    ("lora.target_modules", [["q", "v"], ["q", "k", "v", "o"], "all-linear"])]
    points = grid_points(grid, full_finetune=True)
    assert len(points) == 3 * 2 * 3 + 1 and len({p.name for p in points}) == len(points)
    assert points[0].overrides == ["lora.r=4", "training.lr=0.0002", 'lora.target_modules=["q", "v"]']
    assert points[-1].overrides == ["method=full", "lora=null", "training.lr=2e-05"]
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        parse_grid(["lora.r"])
    alike = grid_points(parse_grid(["lora.target_modules=[q,v],q|v,all-linear"]))  # [q,v] and q|v both read q-v
    assert len({p.name for p in alike}) == 3 and alike[2].name == "target_modules=all-linear"


def test_sweep_rows_resume_and_cli(tiny_model_dir, tmp_path, monkeypatch):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=2)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    rows = run_sweep(config, [], ["lora.r=2,4", "training.lr=1e-3,1e-2"], full_finetune=True, full_lr=1e-4)
    assert [r["point"] for r in rows] == ["r=2,lr=0.001", "r=2,lr=0.01", "r=4,lr=0.001", "r=4,lr=0.01", "full,lr=0.0001"]
    assert rows[0]["trainable"] < rows[2]["trainable"] < rows[4]["trainable"]
    assert all(r["val_loss"] > 0 for r in rows)
    assert json.loads((tmp_path / "run" / "sweep" / "sweep.json").read_text()) == rows

    import lorakit.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "train", lambda *a, **k: pytest.fail("a finished point was trained again"))
    result = CliRunner().invoke(app, ["sweep", str(config), "--grid", "lora.r=2,4", "--grid", "training.lr=1e-3,1e-2",
                                      "--full-finetune", "--full-lr", "1e-4"])
    assert result.exit_code == 0, result.output
    assert result.output.count("r=") >= 4 and "full,lr=0.0001" in result.output
    assert (tmp_path / "run" / "sweep" / "sweep.png").is_file()


def test_a_point_finished_with_other_settings_is_refused_not_reported(tiny_model_dir, tmp_path, monkeypatch):
    """A rerun that changed the config, the data or the scoring would report the earlier
    results as if they were this sweep's: it is refused, naming the point and what changed."""
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=1)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_sweep(config, [], ["lora.r=2"])
    point = tmp_path / "run" / "sweep" / "r=2"
    assert json.loads((point / "point.json").read_text())["config"]["lora"]["r"] == 2

    import lorakit.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "train", lambda *a, **k: pytest.fail("a refused point was trained"))
    for overrides, metrics, says in [(["training.lr=0.5"], None, "config.training.lr: 0.01 then, 0.5 now"),
                                     ([], ["rouge"], "scoring.metrics: [] then, ['rouge'] now")]:
        with pytest.raises(InputError, match=re.escape(says)):
            run_sweep(config, overrides, ["lora.r=2"], metrics=metrics)
    data = Path(raw["data"]["train"])
    data.write_text(data.read_text() + '{"question": "9+9=", "answer": "18"}\n')
    with pytest.raises(InputError, match=r"r=2 ran with other settings \(data.train: the file changed\)"):
        run_sweep(config, [], ["lora.r=1,2"])  # every point is checked before any trains
    assert not (tmp_path / "run" / "sweep" / "r=1").exists()
    (point / "point.json").unlink()
    with pytest.raises(InputError, match="did not record"):
        run_sweep(config, [], ["lora.r=2"])
