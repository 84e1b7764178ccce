"""The command line: help for newcomers, clean failures with exit codes, the train command."""

import yaml
from typer.testing import CliRunner

from conftest import tiny_config, write_jsonl
from lorakit.cli import app

runner = CliRunner()


def _config(tmp_path, raw):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_help_for_every_command():
    for args, expected in ([["--help"], "train"], [["train", "--help"], "--resume"],
                           [["config", "show", "--help"], "fully resolved"], [["merge", "--help"], "--weights"],
                           [["eval", "--help"], "--compare-base"], [["generate", "--help"], "--adapter"],
                           [["sweep", "--help"], "--grid"], [["targets", "--help"], "--target-modules"],
                           [["inspect", "--help"], "--base"], [["data", "preview", "--help"], "--n"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and expected in result.output
    assert "--set" in runner.invoke(app, ["train", "--help"]).output


def test_config_errors_exit_2_with_every_problem(tmp_path):
    path = _config(tmp_path, {"lora": {"r": 0, "dropuot": 0.1}, "data": {"train": "nope.jsonl"},
                              "training": {"max_steps": 1}})
    result = runner.invoke(app, ["train", path])
    assert result.exit_code == 2
    assert "lora.r: must be > 0" in result.output
    assert "lora.dropuot: unknown key; did you mean lora.dropout?" in result.output
    missing = runner.invoke(app, ["train", str(tmp_path / "absent.yaml")])
    assert missing.exit_code == 2 and "cannot read the config file" in missing.output


def test_config_show_prints_resolved_config_with_overrides(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}])
    path = _config(tmp_path, {"data": {"train": train}, "training": {"max_steps": 2}})
    result = runner.invoke(app, ["config", "show", path, "--set", "lora.r=32"])
    assert result.exit_code == 0
    shown = yaml.safe_load(result.output)
    assert shown["lora"]["r"] == 32 and shown["lora"]["alpha"] == 16
    assert shown["model"]["name_or_path"] == "default" and shown["training"]["max_steps"] == 2


def test_train_command_writes_adapter(tiny_model_dir, tmp_path):
    path = _config(tmp_path, tiny_config(tmp_path, tiny_model_dir, max_steps=2))
    result = runner.invoke(app, ["train", path, "--set", "training.max_steps=3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line for line in metrics) == 3


def test_data_errors_exit_2_with_the_line(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir)
    raw["data"]["train"] = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1="}])
    result = runner.invoke(app, ["train", _config(tmp_path, raw)])
    assert result.exit_code == 2
    assert "bad.jsonl, line 1: no field 'answer'" in result.output


def test_wrong_target_exits_2_listing_layers(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir)
    raw["lora"]["target_modules"] = ["query"]
    result = runner.invoke(app, ["train", _config(tmp_path, raw)])
    assert result.exit_code == 2 and "lora: target_modules" in result.output and "q_proj" in result.output and "'query'" in result.output


def test_missing_models_are_clean_errors(tiny_model_dir, tmp_path):
    missing = runner.invoke(app, ["targets", str(tmp_path / "no-such-model")])
    assert missing.exit_code == 2 and "no such file or directory" in missing.output
    raw = tiny_config(tmp_path, tiny_model_dir)
    (tmp_path / "empty").mkdir()
    raw["model"]["name_or_path"] = str(tmp_path / "empty")  # exists, holds no model
    result = runner.invoke(app, ["train", _config(tmp_path, raw)])
    assert result.exit_code == 2 and "model.name_or_path: " in result.output and "cannot read a model config" in result.output


def test_bad_sweep_grid_exits_2(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["sweep", _config(tmp_path, tiny_config(tmp_path, tiny_model_dir)), "--grid", "lora.r"])
    assert result.exit_code == 2 and "expected KEY=V1,V2" in result.output


def test_a_full_disk_while_writing_weights_is_named_not_unexpected(capsys):
    """safetensors reports a failed write as its own error type: a full disk reads as
    such, with the failure exit code, not as a lorakit bug."""
    import pytest
    import typer
    from safetensors import SafetensorError

    from lorakit.cli import _handled

    def write():
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(typer.Exit) as stopped:
        _handled(write)()
    assert stopped.value.exit_code == 1
    said = capsys.readouterr()
    assert "No space left on device" in said.out + said.err and "unexpected" not in said.out + said.err


def test_libraries_are_quieted_without_importing_datasets():
    # merge, export and generate never use datasets: quieting it must not import it (1.6 s),
    # and a later import (data loading, eval's metrics) must still come up quiet
    import subprocess
    import sys

    code = ("import sys; from lorakit.cli import _quiet_libraries; _quiet_libraries(); "
            "assert 'datasets' not in sys.modules; import logging, datasets; "
            "from datasets.utils.tqdm import are_progress_bars_disabled; "
            "assert are_progress_bars_disabled(); assert datasets.logging.get_verbosity() == logging.ERROR")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_generate_and_eval_setup_import_no_metric_library():
    # evaluate and datasets cost seconds to import; only scoring a generation metric needs them
    import subprocess
    import sys

    code = ("import sys; import lorakit.evaluation; from lorakit.cli import Metric; from lorakit.metrics import METRICS; "
            "assert [m.value for m in Metric] == list(METRICS); "
            "assert not {'evaluate', 'datasets'} & set(sys.modules), sorted({'evaluate', 'datasets'} & set(sys.modules)); "
            "from lorakit.metrics import score; assert score('exact_match', ['A '], ['a']) == {'exact_match': 1.0}; "
            "assert 'evaluate' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
