"""Config validation: every problem named by key path, all at once, before any model loads."""

from pathlib import Path

import pytest
import yaml

from lorakit.config import ConfigError, config_to_dict, load_config, parse_overrides

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def _write(tmp_path, raw) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


@pytest.fixture
def good(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    return {"data": {"train": str(tmp_path / "t.jsonl")}, "training": {"max_steps": 3}}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path, monkeypatch, tmp_path):
    monkeypatch.chdir(Path(__file__).parent.parent)
    overrides = []
    if (yaml.safe_load(path.read_text()).get("lora") or {}).get("init_from"):
        # It starts from another run's adapter (quickstart-dpo from the quickstart), which a
        # fresh clone does not have yet: any adapter directory stands in for it here.
        (tmp_path / "adapter_config.json").write_text("{}")
        overrides.append(f"lora.init_from={tmp_path}")
    cfg = load_config(path, overrides)
    assert cfg.training.max_steps or cfg.training.epochs


def test_defaults_fill_in(good, tmp_path):
    cfg = load_config(_write(tmp_path, good))
    assert cfg.model.name_or_path == "default" and cfg.lora.target_modules == ["q", "v"]
    assert cfg.lora.r == 8 and cfg.training.batch_size == 8 and cfg.data.train_on_prompt is False
    assert cfg.model.trust_remote_code is False
    resolved = config_to_dict(cfg)
    assert resolved["lora"]["alpha"] == 16 and resolved["training"]["scheduler"] == "cosine"


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"lora": {"r": 0}}, "lora.r: must be > 0"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout: must be in [0, 1)"),
        ({"training": {"max_steps": 3, "batch_size": 0}}, "training.batch_size: Input should be greater than 0"),
        ({"training": {"max_steps": 3, "lr": "fast"}}, "training.lr: Input should be a valid number"),
        ({"model": {"dtpye": "float32"}}, "model.dtpye: unknown key; did you mean model.dtype?"),
        ({"lora": {"rank": 8}}, "lora.rank: unknown key"),
        ({"trainig": {}}, "trainig: unknown key; did you mean training?"),
        ({"training": {}}, "set training.max_steps or training.epochs"),
        ({"data": {"train": "missing.jsonl"}}, "data.train: no such file or directory: 'missing.jsonl'"),
        ({"model": {"quantization": {"bits": 3}}}, "model.quantization.bits: Input should be 4 or 8"),
        ({"model": {"quantization": {"bits": 8, "compute_dtype": "bfloat16"}}},
         "model.quantization.compute_dtype: applies to 4-bit bases only"),
        ({"model": {"quantization": {"bits": 8, "quant_type": "fp4"}}}, "model.quantization.quant_type: applies to"),
        ({"data": {"format": "sharegpt"}}, "data.format: Input should be"),
    ],
)
def test_each_problem_is_named(good, tmp_path, patch, expected):
    for section, values in patch.items():
        good[section] = {**good.get(section, {}), **values} if values else values
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, good))
    assert expected in str(err.value)


def test_an_8bit_base_without_4bit_settings_loads(good, tmp_path):
    good["model"] = {"quantization": {"bits": 8}}
    assert load_config(_write(tmp_path, good)).model.quantization.bits == 8


def test_all_problems_reported_together(good, tmp_path):
    good["lora"] = {"r": -1, "alpha": 0}
    good["training"] = {"max_steps": 3, "batch_size": 0}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, good))
    assert len(err.value.problems) == 3


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_yaml_is_loaded_safely(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: !!python/object/apply:os.system ['echo hi']\n"))


def test_overrides(good, tmp_path):
    cfg = load_config(_write(tmp_path, good), ["training.lr=1e-4", "lora.r=16", "lora.target_modules=[q, k]",
                                               "model.quantization={bits: 4}"])
    assert cfg.training.lr == 1e-4 and cfg.lora.r == 16 and cfg.lora.target_modules == ["q", "k"]
    assert cfg.model.quantization.quant_type == "nf4"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["training.lr"])
    with pytest.raises(ConfigError, match="lora.rr: unknown key; did you mean lora.r"):
        load_config(_write(tmp_path, good), ["lora.rr=4"])


@pytest.mark.parametrize(("data", "training", "warned"), [
    ({"format": "text", "completion_field": "answer"}, {},
     "data.completion_field has no effect: format text does not read it"),
    ({"format": "chat", "text_field": "body"}, {}, "data.text_field has no effect: format chat"),
    ({"format": "alpaca", "prompt_template": "{question}"}, {}, "data.prompt_template has no effect: format alpaca"),
    ({"format": "chat", "chat_template": False}, {}, "data.chat_template: false has no effect"),
    ({"validation_limit": 5}, {}, "data.validation_limit has no effect: data.validation is not set"),
    ({}, {"eval_every": 5}, "training.eval_every has no effect: data.validation is not set"),
    ({}, {"keep_checkpoints": 3}, "training.keep_checkpoints has no effect: training.save_every is not set"),
])
def test_keys_the_run_never_reads_are_warned_about(good, tmp_path, caplog, data, training, warned):
    good["data"].update(data)
    good["training"].update(training)
    load_config(_write(tmp_path, good))
    assert warned in caplog.text and "c.yaml" in caplog.text


def test_keys_that_are_read_or_null_raise_no_warning(good, tmp_path, caplog):
    good["data"].update(format="text", text_field="body", validation_limit=None)
    good["training"].update(eval_every=None, save_every=None)
    load_config(_write(tmp_path, good))
    good["data"] = {"train": good["data"]["train"], "format": "chat", "chat_template": True}
    load_config(_write(tmp_path, good))
    assert "has no effect" not in caplog.text
