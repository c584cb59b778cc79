"""Config loader: precedence, unknown keys with suggestions, types, safe YAML, reference file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pricing_cli.config import (
    Settings,
    documented_yaml,
    env_overrides,
    load_settings,
    parse_size,
)
from pricing_cli.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_documented_defaults() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.preprocess.batch_size == 500
    assert settings.data.max_bad_fraction == 0.01


def test_precedence_defaults_preset_file_env_flags(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "preprocess:\n  batch_size: 40\n  workers: 3\n"
                "train:\n  seed: 11\n")
    # preset tiny sets batch_size 5 and workers 2; the file overrides both.
    s = load_settings(cfg, "tiny", {}, environ={})
    assert (s.preprocess.batch_size, s.preprocess.workers, s.train.seed) == (40, 3, 11)
    # env beats the file
    env = {"PRICECTL_PREPROCESS__BATCH_SIZE": "60", "PRICECTL_TRAIN__SEED": "12"}
    s = load_settings(cfg, "tiny", {}, environ=env)
    assert (s.preprocess.batch_size, s.preprocess.workers, s.train.seed) == (60, 3, 12)
    # flags beat env; a None flag is "not given"
    s = load_settings(cfg, "tiny", {"preprocess.batch_size": 70, "train.seed": None}, environ=env)
    assert (s.preprocess.batch_size, s.train.seed) == (70, 12)
    # the preset alone sits above defaults
    s = load_settings(None, "tiny", {}, environ={})
    assert (s.preprocess.batch_size, s.generate.n_products) == (5, 12)


def test_config_file_from_env_variable(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "merge:\n  strategy: accumulative\n")
    s = load_settings(environ={"PRICECTL_CONFIG": str(cfg)})
    assert s.merge.strategy == "accumulative"


def test_env_values_get_yaml_types() -> None:
    nested = env_overrides({"PRICECTL_FEATURES__LAGS": "[1, 2, 3]",
                            "PRICECTL_DATA__COLUMNS__DATE": "InvoiceDate",
                            "HOME": "/root", "PRICECTL_CONFIG": "x.yaml"})
    assert nested == {"features": {"lags": [1, 2, 3]}, "data": {"columns": {"date": "InvoiceDate"}}}


def test_misspelt_key_names_file_and_closest_key(tmp_path: Path) -> None:
    cfg = write(tmp_path / "typo.yaml", "preprocess:\n  batch_sise: 10\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert info.value.message == f"unknown config key 'preprocess.batch_sise' in {cfg}"
    assert "did you mean 'preprocess.batch_size'?" in info.value.hint


def test_misspelt_section_and_nested_key(tmp_path: Path) -> None:
    cfg = write(tmp_path / "typo.yaml", "preproces:\n  batch_size: 10\n")
    with pytest.raises(ConfigError, match="unknown config key 'preproces'") as info:
        load_settings(cfg, environ={})
    assert "did you mean 'preprocess'?" in info.value.hint
    cfg = write(tmp_path / "typo2.yaml", "data:\n  columns:\n    quantty: Quantity\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert "'data.columns.quantty'" in info.value.message
    assert "did you mean 'data.columns.quantity'?" in info.value.hint


def test_misspelt_env_variable_and_flag() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.timestep' in environment"):
        load_settings(environ={"PRICECTL_TRAIN__TIMESTEP": "5"})
    with pytest.raises(ConfigError, match="in command-line flags"):
        load_settings(flags={"train.timestepz": 5}, environ={})


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bad.yaml", "preprocess:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert "'preprocess.batch_size'" in info.value.message
    assert "'lots'" in info.value.message
    assert info.value.hint == "Expected int."
    cfg = write(tmp_path / "bad2.yaml", "merge:\n  strategy: parallel\n")
    with pytest.raises(ConfigError, match="merge.strategy") as info:
        load_settings(cfg, environ={})
    assert info.value.hint == "Expected one of 'sequential', 'accumulative'."


def test_out_of_range_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match="preprocess.batch_size"):
        load_settings(flags={"preprocess.batch_size": 0}, environ={})


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bad.yaml", "preprocess: 5\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(cfg, environ={})


def test_unsafe_yaml_is_refused(tmp_path: Path) -> None:
    # A python/object tag would run code under yaml.load; the safe loader refuses it.
    cfg = write(tmp_path / "evil.yaml", "train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(cfg, environ={})


def test_missing_file_and_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="unknown preset 'smal'") as info:
        load_settings(preset="smal", environ={})
    assert "did you mean 'small'?" in info.value.hint


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(Exception, match="frozen"):
        s.preprocess.batch_size = 3  # type: ignore[misc]


def test_parse_size() -> None:
    assert parse_size("1.5GB") == int(1.5 * 1024**3)
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size("800MiB") == 800 * 1024**2
    assert parse_size("4096") == 4096
    with pytest.raises(ConfigError, match="cannot read memory size"):
        parse_size("lots")


def test_reference_yaml_matches_code_and_parses_to_defaults() -> None:
    text = (REPO / "configs" / "default.yaml").read_text(encoding="utf-8")
    assert text == documented_yaml(), (
        "configs/default.yaml is stale: run `pricectl config show --documented > "
        "configs/default.yaml`")
    assert Settings.model_validate(yaml.safe_load(text)) == Settings()


def test_every_key_is_documented() -> None:
    def walk(model: type, prefix: str) -> list[str]:
        missing = []
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                missing += walk(annotation, f"{prefix}{name}.")
            elif not info.description:
                missing.append(prefix + name)
        return missing

    assert walk(Settings, "") == []


@pytest.mark.parametrize("preset", ["tiny", "small", "full"])
def test_presets_load(preset: str) -> None:
    """Every value a preset file sets is the loaded setting's; the rest stay the defaults."""
    text = (REPO / "pricing_cli" / "presets" / f"{preset}.yaml").read_text()
    written = yaml.safe_load(text)
    settings = load_settings(preset=preset, environ={})
    defaults = Settings()
    assert len(written) >= 3  # sections the preset sets
    for section, values in written.items():
        for key, value in values.items():
            got = getattr(getattr(settings, section), key)
            assert (list(got) if isinstance(got, tuple) else got) == value, (section, key)
    for section in set(Settings.model_fields) - set(written):
        assert getattr(settings, section) == getattr(defaults, section), section


def test_the_change_cost_example_config_loads() -> None:
    settings = load_settings(preset="small", config_file=REPO / "configs" / "change-cost.yaml",
                             environ={})
    assert (settings.train.price_change_cost, settings.train.warm_start,
            settings.train.forecast_prior) == (0.25, "planner", 10.0)
    assert settings.train.n_envs == 16  # the rest stays the preset's and the defaults
