"""Hostile configs (issue 9, docs/security.md): bombs are refused fast, bad values are errors.

Each case runs `pricectl config validate` through the real entry point and checks the exit
code (3, config error), the exact message, and that it takes well under a second (the alias
bomb took 3 minutes and then ran out of memory; the 50 MB list ran for more than 5 minutes).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pricing_cli import cli
from pricing_cli.config import MAX_CONFIG_BYTES, load_settings
from pricing_cli.errors import ConfigError

# "billion laughs": under 500 bytes that stand for 9^9 = 387,420,489 strings, under a typed key
ALIAS_BOMB = ("train:\n  timesteps:\n    - &a [" + ",".join(['"lol"'] * 9) + "]\n" + "".join(
    f"    - &{level} [" + ",".join([f"*{chr(ord(level) - 1)}"] * 9) + "]\n"
    for level in "bcdefghi"))
ALIAS_MESSAGE = (
    "expands to more than 10,000 values through YAML anchors and aliases (&name / *name); "
    "pricectl refuses it before building it, because a few hundred bytes of nested aliases "
    "can stand for billions of values\n"
    "  hint: Write the values out without aliases; a real config holds a few hundred.\n")


def validate(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
             name: str = "my.yaml") -> tuple[int, str, float]:
    """Exit code, stderr and seconds of `pricectl config validate` on ``text``."""
    path = tmp_path / name
    path.write_text(text)
    started = time.perf_counter()
    code = cli.main(["config", "validate", str(path)])
    return code, capsys.readouterr().err, time.perf_counter() - started


def test_a_yaml_alias_bomb_is_refused_in_milliseconds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert len(ALIAS_BOMB) < 500
    code, err, seconds = validate(tmp_path, capsys, ALIAS_BOMB)
    assert (code, err) == (3, f"pricectl: config error: config file {tmp_path / 'my.yaml'} "
                              + ALIAS_MESSAGE)
    assert seconds < 2.0  # wall clock, on a shared 2-core machine: no blow-up, not a benchmark


def test_an_alias_to_its_own_ancestor_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err, _ = validate(tmp_path, capsys, "train:\n  net_arch: &a [*a]\n")
    assert (code, err) == (3, f"pricectl: config error: config file {tmp_path / 'my.yaml'} "
                              + ALIAS_MESSAGE)


def test_small_aliases_still_work(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("features:\n  lags: &days [1, 7]\n  windows: *days\n")
    with pytest.raises(ConfigError, match=r"'features.windows'.*every entry must be >= 2 days"):
        load_settings(path, environ={})
    path.write_text("features:\n  lags: &days [2, 7]\n  windows: *days\n")
    settings = load_settings(path, environ={})
    assert settings.features.lags == settings.features.windows == [2, 7]


def test_an_oversized_config_file_is_refused_unread(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lags = ", ".join(["1"] * (MAX_CONFIG_BYTES // 3 + 1))  # a 1 MiB list under features.lags
    code, err, seconds = validate(tmp_path, capsys, f"features:\n  lags: [{lags}]\n")
    assert code == 3
    assert err == (
        f"pricectl: config error: config file {tmp_path / 'my.yaml'} is larger than 1,048,576 "
        "bytes; pricectl does not read it\n"
        "  hint: A config holds settings, not data: the documented reference "
        "(configs/default.yaml) is about 10 KiB. Check that --config names the right file.\n")
    assert seconds < 2.0  # wall clock, on a shared 2-core machine: no blow-up, not a benchmark


def test_a_long_list_under_a_list_key_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lags = ", ".join(str(day) for day in range(1, 5001))  # 24 kB: under the file cap
    code, err, seconds = validate(tmp_path, capsys, f"features:\n  lags: [{lags}]\n")
    assert code == 3
    assert err == (
        "pricectl: config error: config key 'features.lags' has an invalid value "
        f"[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, ...] (from defaults < {tmp_path / 'my.yaml'}): "
        "List should have at most 64 items after validation, not 5000\n"
        "  hint: Expected list[int]; the default is [1, 7, 14] (configs/default.yaml).\n")
    assert seconds < 2.0  # wall clock, on a shared 2-core machine: no blow-up, not a benchmark


def test_an_error_message_echoes_at_most_200_characters_of_a_value(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err, _ = validate(tmp_path, capsys, "train:\n  timesteps: " + "x" * 100_000 + "\n")
    assert code == 3
    echoed = "'" + "x" * 97 + "..." + "x" * 98 + "'"
    assert err == (
        f"pricectl: config error: config key 'train.timesteps' has an invalid value {echoed} "
        f"(from defaults < {tmp_path / 'my.yaml'}): Input should be a valid integer, unable to "
        "parse string as an integer\n  hint: Expected int.\n")
    assert len(echoed) == 200
    code, err, _ = validate(tmp_path, capsys, "train:\n  " + "k" * 1000 + ": 1\n")
    assert code == 3
    assert err.startswith(
        f"pricectl: config error: unknown config key 'train.{'k' * 197}...' in ")
    assert len(err) < 1000
    # a YAML syntax error quotes the offending line: cut too
    code, err, _ = validate(tmp_path, capsys, "train:\n  " + "k" * 10_000 + ": 1\n")
    assert code == 3 and "is not valid YAML at line 2" in err and len(err) < 800


# ----------------------------------------------------------------------------------------------
# Values that are user errors, not bugs


@pytest.mark.parametrize(("text", "message", "hint"), [
    ("features:\n  val_start: 2023-02-30\n",
     "config key 'features.val_start' has an invalid value '2023-02-30' (from defaults < {f}): "
     "Input should be a valid date or datetime, day value is outside expected range",
     "Expected a real calendar date (YYYY-MM-DD) or null."),
    ("generate:\n  start_date: 2023-13-01\n",
     "config key 'generate.start_date' has an invalid value '2023-13-01' (from defaults < {f}): "
     "Input should be a valid date or datetime, month value is outside expected range of 1-12",
     "Expected a real calendar date (YYYY-MM-DD)."),
    ("train:\n  net_arch: [-1]\n",
     "config key 'train.net_arch' has an invalid value [-1] (from defaults < {f}): Value error, "
     "every layer must have 1..65536 units",
     "Expected list[int]; the default is [64, 64] (configs/default.yaml)."),
    ("train:\n  learning_rate: .inf\n",
     "config key 'train.learning_rate' has an invalid value inf (from defaults < {f}): Input "
     "should be a finite number",
     "Expected float; the default is 0.0003 (configs/default.yaml)."),
    ("train:\n  learning_rate: .nan\n",
     "config key 'train.learning_rate' has an invalid value nan (from defaults < {f}): Input "
     "should be a finite number",
     "Expected float; the default is 0.0003 (configs/default.yaml)."),
    ("train:\n  learning_rate: -0.1\n",
     "config key 'train.learning_rate' has an invalid value -0.1 (from defaults < {f}): Input "
     "should be greater than 0",
     "Expected float; the default is 0.0003 (configs/default.yaml)."),
    ("train:\n  gamma: .inf\n",
     "config key 'train.gamma' has an invalid value inf (from defaults < {f}): Input should be "
     "a finite number", "Expected float; the default is 0.9 (configs/default.yaml)."),
    ("train:\n  seed: -1\n",
     "config key 'train.seed' has an invalid value -1 (from defaults < {f}): Input should be "
     "greater than or equal to 0", "Expected int; the default is 0 (configs/default.yaml)."),
    ("train:\n  seed: 4294967296\n",
     "config key 'train.seed' has an invalid value 4294967296 (from defaults < {f}): Input "
     "should be less than or equal to 4294967295",
     "Expected int; the default is 0 (configs/default.yaml)."),
    ("features:\n  lags: [1, 100000]\n",
     "config key 'features.lags' has an invalid value [1, 100000] (from defaults < {f}): Value "
     "error, every entry must be at most 3660 days (ten years)",
     "Expected list[int]; the default is [1, 7, 14] (configs/default.yaml)."),
    ("train:\n  price_change_cost: .inf\n",
     "config key 'train.price_change_cost' has an invalid value inf (from defaults < {f}): "
     "Input should be a finite number",
     "Expected float; the default is 0.0 (configs/default.yaml)."),
    ("train:\n  timesteps: " + "9" * 5000 + "\n",
     "config file {f} holds a value the YAML reader cannot build: Exceeds the limit (4300 "
     "digits) for integer string conversion: value has 5000 digits; use "
     "sys.set_int_max_str_digits() to increase the limit",
     "Check numbers and dates, e.g. 2023-02-28, not 2023-02-30."),
])
def test_a_bad_value_is_a_config_error_naming_the_key_and_the_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str,
        hint: str) -> None:
    code, err, seconds = validate(tmp_path, capsys, text)
    f = tmp_path / "my.yaml"
    assert (code, err) == (3, f"pricectl: config error: {message.format(f=f)}\n"
                              f"  hint: {hint}\n")
    assert seconds < 2.0  # wall clock, on a shared 2-core machine: no blow-up, not a benchmark


def test_an_invalid_date_in_the_environment_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"PRICECTL_FEATURES__VAL_START": "2023-02-30"})
    assert info.value.message == (
        "config key 'features.val_start' has an invalid value '2023-02-30' (from defaults < "
        "environment): Input should be a valid date or datetime, day value is outside expected "
        "range")


def test_an_alias_bomb_in_the_environment_is_refused() -> None:
    # one variable holds a whole bomb: 10 levels of 10 aliases, 10^10 values
    text = "[" + ",".join(["&a0 [" + ",".join(["1"] * 10) + "]"] +
                          [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]"
                           for i in range(1, 10)]) + "]"
    assert len(text) < 1000
    with pytest.raises(ConfigError, match="^environment variable PRICECTL_FEATURES__LAGS expands "
                                          "to more than 10,000 values"):
        load_settings(environ={"PRICECTL_FEATURES__LAGS": text})
