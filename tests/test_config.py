"""Settings come from flags, then SEQSERVE_* variables, then defaults; bad ones stop."""

import dataclasses
from pathlib import Path

import pytest

from seqserve.server.__main__ import main
from seqserve.server.config import Config

from certs import Authority


def test_defaults_without_flags_or_environment():
    assert Config.from_args([], environ={}) == Config()
    assert Config().idle_timeout_s == 0.0


def test_flags_set_every_kind_of_field():
    config = Config.from_args(
        [
            "--model-dir=/srv/models",
            "--port=0",
            "--max-sessions=7",
            "--idle-timeout-s=2.5",
            "--allow-unsafe-deserialization",
            "--log-level=DEBUG",
        ],
        environ={},
    )
    assert config.model_dir == Path("/srv/models")
    assert (config.port, config.max_sessions, config.idle_timeout_s) == (0, 7, 2.5)
    assert config.allow_unsafe_deserialization is True
    assert config.log_level == "DEBUG"


def test_environment_fills_what_flags_leave_and_flags_win():
    environ = {
        "SEQSERVE_PORT": "6000",
        "SEQSERVE_MAX_BATCH_SIZE": "16",
        "SEQSERVE_ALLOW_UNSAFE_DESERIALIZATION": "yes",
        "SEQSERVE_IDLE_TIMEOUT_S": "30",
        "OTHER_PORT": "1",
    }
    config = Config.from_args(["--port", "7000"], environ=environ)
    assert (config.port, config.max_batch_size, config.idle_timeout_s) == (7000, 16, 30)
    assert config.allow_unsafe_deserialization is True
    off = Config.from_args([], environ={"SEQSERVE_ALLOW_UNSAFE_DESERIALIZATION": "0"})
    assert off.allow_unsafe_deserialization is False


@pytest.mark.parametrize(
    "name, value",
    [
        ("port", "http"),
        ("port", "70000"),
        ("port", "-1"),
        ("max_sessions", "0"),
        ("max_sessions", "1.5"),
        ("idle_timeout_s", "-1"),
        ("idle_timeout_s", "nan"),
        ("max_batch_size", "0"),
        ("max_queued_steps", "-1"),
        ("max_queued_steps", "many"),
        ("worker_threads", "0"),
        ("allow_unsafe_deserialization", "maybe"),
        ("log_level", "LOUD"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(name, value):
    # Config errors have no status code; naming the setting is the contract.
    variable = "SEQSERVE_" + name.upper()
    with pytest.raises(ValueError, match=name):
        Config.from_args([], environ={variable: value})
    if name != "allow_unsafe_deserialization":  # a flag without a value
        with pytest.raises(ValueError, match=name):
            Config.from_args([f"--{name.replace('_', '-')}={value}"], environ={})


@pytest.mark.parametrize("flag", ["--max-session=3", "--timeout=3"])
def test_unknown_or_abbreviated_flag_stops_with_usage_status(flag):
    with pytest.raises(SystemExit) as caught:
        Config.from_args([flag], environ={})
    assert caught.value.code == 2


def test_config_is_frozen_and_validated_at_construction():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().port = 1
    with pytest.raises(ValueError, match="max_sessions"):
        Config(max_sessions=0)


def test_command_line_reports_a_bad_value_and_exits_2(capsys):
    assert main(["--port=http"]) == 2
    assert "port" in capsys.readouterr().err


def readme_settings() -> dict[str, list[str]]:
    """The README's configuration table: flag -> [variable, unit, default]."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    cells = [[c.strip().strip("`") for c in row.split("|")[1:-1]] for row in rows]
    return {flag: rest[:3] for flag, *rest in cells}


def shown(default: object) -> str:
    if default is None or default is False or default == "":
        return "off"
    return f"{default:g}" if isinstance(default, float) else str(default)


def test_readme_lists_exactly_the_settings_of_config_with_their_defaults():
    listed = readme_settings()
    expected = {
        "--" + field.name.replace("_", "-"): [
            "SEQSERVE_" + field.name.upper(),
            listed.get("--" + field.name.replace("_", "-"), ["", "?"])[1],
            shown(field.default),
        ]
        for field in dataclasses.fields(Config)
    }
    assert listed == expected
    assert all(unit for _, unit, _ in listed.values())


@pytest.mark.parametrize(
    "name, value",
    [
        ("metrics_port", "70000"),
        ("metrics_port", "on"),
        ("log_format", "xml"),
        ("when_full", "evict"),
        ("drain_s", "-1"),
        ("drain_s", "nan"),
        ("shutdown_grace_s", "3601"),
    ],
)
def test_operations_settings_are_validated(name, value):
    with pytest.raises(ValueError, match=name):
        Config.from_args([], environ={"SEQSERVE_" + name.upper(): value})


def test_metrics_port_is_off_a_number_or_any_and_not_the_grpc_port():
    assert Config.from_args(["--metrics-port=off"], environ={}).metrics_port is None
    assert Config.from_args(["--metrics-port=9090"], environ={}).metrics_port == 9090
    assert Config(port=0, metrics_port=0).metrics_port == 0
    with pytest.raises(ValueError, match="metrics_port"):
        Config(port=9090, metrics_port=9090)


def test_command_line_refuses_a_bad_setting_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("SEQSERVE_WHEN_FULL", "sometimes")
    assert main([]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    "setting, flag, problem",
    [
        ("model_dir", "--model-dir", "missing"),
        ("token_file", "--token-file", "missing"),
        ("token_file", "--token-file", "malformed"),
        ("admin_token_file", "--admin-token-file", "missing"),
        ("tls_cert_file", "--tls-cert-file", "missing"),
        ("tls_cert_file", "--tls-cert-file", "malformed"),
        ("tls_client_ca_file", "--tls-client-ca-file", "malformed"),
        ("snapshot_dir", "--snapshot-dir", "a file"),
    ],
)
def test_command_line_refuses_a_bad_file_in_one_line_naming_it(
    setting, flag, problem, tmp_path, capsys, monkeypatch
):
    # Checked before the server listens or loads a model: an empty model
    # directory is enough, and nothing is ever served.
    monkeypatch.setattr("seqserve.server.__main__.configure", lambda *_: None)
    models = tmp_path / "models"
    models.mkdir()
    cert, key = Authority().issue("seqserve", server=True).write(tmp_path, "server")
    settings = {
        "--model-dir": models,
        "--tls-cert-file": cert,
        "--tls-key-file": key,
    }
    settings[flag] = tmp_path / problem
    if problem == "malformed":
        settings[flag].write_text("neither tokens nor a certificate\n")
    if problem == "a file":
        settings[flag].write_text("not a directory\n")
    argv = ["--port=0", *(f"{name}={value}" for name, value in settings.items())]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith(f"seqserve-server: {setting}: ")
