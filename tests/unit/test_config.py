"""Configuration: precedence (default < file < env < --set < flags) and the errors a
user sees, through the loader and through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sentinel.config import ConfigError, load_config
from sentinel.config.loader import default_yaml_text
from sentinel.config.schema import SentinelConfig

ROOT = Path(__file__).resolve().parents[2]


def write(tmp: Path, data: object, name: str = "c.yaml") -> Path:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_no_file_gives_the_embedded_default() -> None:
    cfg = load_config(None, environ={})
    assert cfg == SentinelConfig.model_validate(yaml.safe_load(default_yaml_text()))
    assert cfg.engine.port == 8001


def test_precedence_file_env_set_flag(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "engine": {"port": 1001, "model": "m-file"},
            "supervisor": {"stop_grace_s": 3, "backoff_initial_s": 2},
        },
    )
    env = {"SENTINEL_ENGINE__PORT": "1002", "SENTINEL_SUPERVISOR__STOP_GRACE_S": "4"}
    # file only
    assert load_config(path, environ={}).engine.port == 1001
    # env beats file
    cfg = load_config(path, environ=env)
    assert (cfg.engine.port, cfg.supervisor.stop_grace_s) == (1002, 4.0)
    assert cfg.supervisor.backoff_initial_s == 2.0  # untouched keys keep the file's value
    # --set beats env
    cfg = load_config(path, environ=env, sets=["engine.port=1003"])
    assert cfg.engine.port == 1003 and cfg.supervisor.stop_grace_s == 4.0
    # a named flag beats --set
    cfg = load_config(
        path,
        environ=env,
        sets=["engine.port=1003", "engine.model=m-set"],
        overrides={"engine.model": "m-flag"},
    )
    assert cfg.engine.model == "m-flag" and cfg.engine.port == 1003


def test_env_values_are_yaml_and_nested_keys_join_with_double_underscore() -> None:
    env = {
        "SENTINEL_ENGINE__ARGS": "[--enforce-eager, --max-model-len, '256']",
        "SENTINEL_GPU__DEGRADED__TEMPERATURE_C": "75",
        "SENTINEL_SUPERVISOR__ON_FAILED": "exit",
        "UNRELATED": "x",
    }
    cfg = load_config(None, environ=env)
    assert cfg.engine.args == ["--enforce-eager", "--max-model-len", "256"]
    assert cfg.gpu.degraded.temperature_c == 75.0
    assert cfg.supervisor.on_failed.value == "exit"


def test_unknown_key_is_named_with_its_origin(tmp_path: Path) -> None:
    path = write(tmp_path, {"engine": {"modle": "x"}})
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    msg = str(err.value)
    assert "engine.modle: unknown key" in msg
    assert f"[from file {path}]" in msg


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"enigne: unknown key"):
        load_config(write(tmp_path, {"enigne": {"port": 1}}), environ={})


def test_wrong_type_names_key_expectation_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, {"engine": {"port": "eighty"}})
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    msg = str(err.value)
    assert "engine.port:" in msg and "integer" in msg and "'eighty'" in msg


def test_impossible_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"engine\.port: .*less than or equal to 65535"):
        load_config(None, environ={"SENTINEL_ENGINE__PORT": "70000"})
    with pytest.raises(ConfigError, match=r"backoff_max_s must be >= backoff_initial_s"):
        load_config(
            None, environ={}, sets=["supervisor.backoff_initial_s=10", "supervisor.backoff_max_s=1"]
        )
    with pytest.raises(ConfigError, match=r"supervisor\.on_failed: .*'stay' or 'exit'"):
        load_config(None, environ={}, sets=["supervisor.on_failed=sometimes"])


def test_env_error_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"\[from env SENTINEL_SUPERVISOR__STOP_GRACE_S\]"):
        load_config(None, environ={"SENTINEL_SUPERVISOR__STOP_GRACE_S": "-1"})


def test_bad_yaml_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "engine: [unclosed", "a.yaml"), environ={})
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- just\n- a list\n", "b.yaml"), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_malformed_set() -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, environ={}, sets=["engine.port"])


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SENTINEL_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sentinel", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=full_env,
    )


def test_cli_run_unknown_key_message(tmp_path: Path) -> None:
    path = write(tmp_path, {"engine": {"port": 8001}, "supervisor": {"grace": 3}})
    r = cli("run", "--config", str(path))
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"sentinel: invalid configuration:\n  supervisor.grace: unknown key [from file {path}]"
    )
    assert r.stdout == ""


def test_cli_run_wrong_type_message(tmp_path: Path) -> None:
    path = write(tmp_path, {"supervisor": {"stop_grace_s": "soon"}})
    r = cli("run", "--config", str(path))
    assert r.returncode == 2
    assert "supervisor.stop_grace_s: Input should be a valid number" in r.stderr
    assert "'soon'" in r.stderr and f"[from file {path}]" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_run_env_error_and_missing_file(tmp_path: Path) -> None:
    r = cli("run", env={"SENTINEL_ENGINE__PORT": "abc"})
    assert r.returncode == 2
    assert "engine.port" in r.stderr and "SENTINEL_ENGINE__PORT" in r.stderr
    r = cli("run", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert "nope.yaml: cannot read: No such file or directory" in r.stderr


def test_cli_set_beats_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"engine": {"model": "from-file"}})
    r = cli(
        "config",
        "--check",
        "--config",
        str(path),
        "--set",
        "engine.model=from-set",
        env={"SENTINEL_ENGINE__MODEL": "from-env"},
    )
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["engine"]["model"] == "from-set"


def test_cli_run_unknown_option_is_not_taken_for_an_engine_command() -> None:
    r = cli("run", "--bogus", "1")
    assert r.returncode == 2
    assert "unknown option '--bogus'" in r.stderr and "after `--`" in r.stderr
