"""Configuration: layering, environment variables, substitution, validation and secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from basidia import Config, ConfigError
from basidia.brokers import broker_from_url, redact_url
from basidia.config import Settings

SENTINEL = "S3CRET-SENTINEL"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(params=["yaml", "toml"])
def config_format(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- precedence ----------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_configured() -> None:
    settings = Config.load(None, environ={}).settings
    assert settings == Settings()
    assert settings.broker == "memory://"
    assert settings.rpc_timeout == 30.0
    assert settings.log_level == "INFO"


def test_cli_beats_environment_beats_file_beats_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "basidia.yaml", "rpc_timeout: 10\nmax_workers: 8\nserializer: json\n")
    environ = {"BASIDIA_RPC_TIMEOUT": "20", "BASIDIA_MAX_WORKERS": "16"}
    overrides = {"rpc_timeout": 40}

    file_only = Config.load(path, environ={}).settings
    assert (file_only.rpc_timeout, file_only.max_workers) == (10.0, 8)

    with_env = Config.load(path, environ=environ).settings
    assert (with_env.rpc_timeout, with_env.max_workers) == (20.0, 16)

    everything = Config.load(path, environ=environ, overrides=overrides).settings
    assert everything.rpc_timeout == 40.0  # CLI wins
    assert everything.max_workers == 16  # environment, no CLI option given
    assert everything.serializer == "json"  # file, nothing above it
    assert everything.shutdown_grace == Settings.shutdown_grace  # default


def test_toml_file_is_a_layer_like_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "basidia.toml", 'broker = "memory://from-toml"\nrpc_timeout = 5\n')
    config = Config.load(path, environ={"BASIDIA_RPC_TIMEOUT": "7"})
    assert config.settings.broker == "memory://from-toml"
    assert config.settings.rpc_timeout == 7.0


def test_double_underscore_in_environment_names_a_nested_key(tmp_path: Path) -> None:
    path = write(
        tmp_path / "basidia.yaml",
        "database:\n  url: sqlite:///file.db\n  pool: 5\n",
    )
    config = Config.load(path, environ={"BASIDIA_DATABASE__URL": "postgres://db/users"})
    assert config["database.url"] == "postgres://db/users"
    assert config["database.pool"] == 5  # the sibling from the file survives
    assert config["database"] == {"url": "postgres://db/users", "pool": 5}


def test_environment_values_are_read_as_numbers_and_booleans() -> None:
    config = Config.load(
        None,
        environ={
            "BASIDIA_MAX_WORKERS": "8",
            "BASIDIA_FEATURES__BETA": "true",
            "BASIDIA_RATIO": "0.5",
            "BASIDIA_NAME": "shop",
        },
    )
    assert config["max_workers"] == 8
    assert config["features.beta"] is True
    assert config["ratio"] == 0.5
    assert config["name"] == "shop"


def test_only_basidia_prefixed_environment_variables_count() -> None:
    config = Config.load(None, environ={"RPC_TIMEOUT": "1", "BASIDIA_": "x", "HOME": "/root"})
    assert config.settings.rpc_timeout == 30.0
    assert "home" not in config


def test_cli_overrides_may_use_dotted_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "basidia.yaml", "database:\n  url: sqlite:///a.db\n  pool: 5\n")
    config = Config.load(
        path,
        environ={"BASIDIA_DATABASE__URL": "sqlite:///b.db"},
        overrides={"database.url": "sqlite:///c.db"},
    )
    assert config["database.url"] == "sqlite:///c.db"
    assert config["database.pool"] == 5


def test_keys_are_case_insensitive_across_layers(tmp_path: Path) -> None:
    path = write(tmp_path / "basidia.yaml", "LOG_LEVEL: DEBUG\nDatabase:\n  URL: sqlite:///a.db\n")
    from_file = Config.load(path, environ={})
    assert from_file["log_level"] == from_file["LOG_LEVEL"] == "DEBUG"
    assert from_file.get("database.url") == from_file.get("DATABASE.URL") == "sqlite:///a.db"
    assert from_file.settings.log_level == "DEBUG"

    layered = Config.load(
        path,
        environ={"BASIDIA_LOG_LEVEL": "warning", "BASIDIA_DATABASE__URL": "sqlite:///b.db"},
    )
    assert layered.settings.log_level == "WARNING"
    assert layered["LOG_LEVEL"] == "warning"
    assert layered["Database.Url"] == "sqlite:///b.db"
    # One setting, not two spellings of it side by side.
    assert [key for key in layered if key.lower() == "log_level"] == ["log_level"]


def test_missing_keys_give_the_default_or_key_error() -> None:
    config = Config({"database": {"url": "sqlite://"}})
    assert config.get("database.password") is None
    assert config.get("database.url.scheme", "none") == "none"
    assert "database.url" in config
    assert "database.user" not in config
    with pytest.raises(KeyError):
        config["cache.url"]


# -- ${VAR} substitution ------------------------------------------------------------


def _substitution_file(directory: Path, fmt: str) -> Path:
    if fmt == "yaml":
        text = (
            "port: ${PORT}\n"
            "debug: ${DEBUG:false}\n"
            "broker: amqp://${HOST:localhost}:${PORT}/\n"
            "database:\n"
            "  url: ${DATABASE_URL:sqlite:///default.db}\n"
            "  name: ${DB_NAME:}\n"
        )
    else:
        text = (
            'port = "${PORT}"\n'
            'debug = "${DEBUG:false}"\n'
            'broker = "amqp://${HOST:localhost}:${PORT}/"\n'
            "[database]\n"
            'url = "${DATABASE_URL:sqlite:///default.db}"\n'
            'name = "${DB_NAME:}"\n'
        )
    return write(directory / f"basidia.{fmt}", text)


def test_variables_and_defaults_are_substituted(tmp_path: Path, config_format: str) -> None:
    path = _substitution_file(tmp_path, config_format)
    config = Config.load(path, environ={"PORT": "5672"})
    assert config["broker"] == "amqp://localhost:5672/"
    assert config["database.url"] == "sqlite:///default.db"
    assert config["database.name"] == ""

    config = Config.load(
        path,
        environ={"PORT": "5673", "HOST": "rabbit", "DATABASE_URL": "postgres://db/users"},
    )
    assert config["broker"] == "amqp://rabbit:5673/"
    assert config["database.url"] == "postgres://db/users"


def test_whole_value_substitution_keeps_types(tmp_path: Path, config_format: str) -> None:
    path = _substitution_file(tmp_path, config_format)
    config = Config.load(path, environ={"PORT": "5672", "DEBUG": "true"})
    assert config["port"] == 5672
    assert config["debug"] is True
    # A variable inside a longer string stays text.
    assert isinstance(config["broker"], str)

    assert Config.load(path, environ={"PORT": "1"})["debug"] is False


def test_substituted_value_feeds_settings(tmp_path: Path) -> None:
    path = write(tmp_path / "basidia.yaml", "rpc_timeout: ${TIMEOUT:12}\nmax_workers: ${W}\n")
    settings = Config.load(path, environ={"W": "3"}).settings
    assert (settings.rpc_timeout, settings.max_workers) == (12.0, 3)


def test_missing_variable_without_default_is_a_config_error(
    tmp_path: Path, config_format: str
) -> None:
    path = _substitution_file(tmp_path, config_format)
    with pytest.raises(ConfigError, match="PORT"):
        Config.load(path, environ={})


def test_missing_variable_inside_a_string_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "basidia.yaml", "dsn: postgres://app:${DB_PASSWORD}@db/app\n")
    with pytest.raises(ConfigError, match="DB_PASSWORD is not set"):
        Config.load(path, environ={})


def test_values_from_the_environment_are_not_substituted_again(tmp_path: Path) -> None:
    path = write(tmp_path / "basidia.yaml", "greeting: ${GREETING}\n")
    config = Config.load(path, environ={"GREETING": "cost: $5 ${not a var}"})
    assert config["greeting"] == "cost: $5 ${not a var}"


def test_substitution_does_not_mangle_text_that_merely_looks_numeric(tmp_path: Path) -> None:
    path = write(
        tmp_path / "basidia.yaml", "database:\n  password: ${DB_PASSWORD}\n  pin: ${PIN}\n"
    )
    config = Config.load(path, environ={"DB_PASSWORD": "Infinity", "PIN": "0042"})
    assert config["database.password"] == "Infinity"
    assert config["database.pin"] == "0042"
    env_config = Config.load(None, environ={"BASIDIA_ACCOUNT__PIN": "007"})
    assert env_config["account.pin"] == "007"


@pytest.mark.parametrize("token", ["0", "1e3", "-1", "007", "true", "off", "Infinity"])
def test_the_management_token_stays_text_from_environment_and_substitution(
    tmp_path: Path, token: str
) -> None:
    # Read as a number, "0" turned authentication off and "1e3" became "1000.0".
    env = Config.load(None, environ={"BASIDIA_HTTP__TOKEN": token, "BASIDIA_HTTP__PORT": "8001"})
    assert env["http.token"] == token
    assert env["http.port"] == 8001  # other values are still read as numbers
    path = write(tmp_path / "basidia.yaml", "HTTP:\n  Token: ${TOKEN}\n  port: ${PORT}\n")
    substituted = Config.load(path, environ={"TOKEN": token, "PORT": "8002"})
    assert substituted["http.token"] == token
    assert substituted["http.port"] == 8002
    assert Config.load(None, environ={}, overrides={"http.token": token})["http.token"] == token


# -- config file errors -------------------------------------------------------------


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        Config.load(tmp_path / "nope.yaml", environ={})


def test_unparsable_config_file_is_a_config_error(tmp_path: Path) -> None:
    bad_yaml = write(tmp_path / "bad.yaml", "broker: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cannot parse config file .*bad\.yaml"):
        Config.load(bad_yaml, environ={})
    bad_toml = write(tmp_path / "bad.toml", "broker = \n")
    with pytest.raises(ConfigError, match=r"cannot parse config file .*bad\.toml"):
        Config.load(bad_toml, environ={})


def test_config_file_must_hold_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "list.yaml", "- broker\n- memory://\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        Config.load(path, environ={})


def test_empty_yaml_file_is_an_empty_layer(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.yaml", "# nothing here yet\n")
    assert Config.load(path, environ={}).settings == Settings()


# -- settings validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rpc_timeout", 0, "rpc_timeout"),
        ("rpc_timeout", 90000, "rpc_timeout"),
        ("max_workers", 0, "max_workers"),
        ("serializer", "xml", "serializer"),
        ("shutdown_grace", -1, "shutdown_grace"),
        ("event_max_attempts", 0, "event_max_attempts"),
        ("max_frame_size", 10, "max_frame_size"),
        ("log_format", "xml", "log_format"),
    ],
)
def test_out_of_range_settings_are_config_errors_naming_the_setting(
    key: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Config({key: value}).settings  # noqa: B018


def test_settings_errors_through_the_environment() -> None:
    with pytest.raises(ConfigError, match="max_workers must be at least 1"):
        Config.load(None, environ={"BASIDIA_MAX_WORKERS": "0"}).settings  # noqa: B018
    with pytest.raises(ConfigError, match="serializer must be 'msgpack', 'json' or one registered"):
        Config.load(None, environ={"BASIDIA_SERIALIZER": "pickle"}).settings  # noqa: B018


def test_settings_values_are_coerced_to_their_types() -> None:
    settings = Config({"rpc_timeout": "2.5", "max_workers": "4", "log_level": "debug"}).settings
    assert settings.rpc_timeout == 2.5
    assert settings.max_workers == 4
    assert settings.log_level == "DEBUG"


def test_wrongly_typed_setting_error_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="rpc_timeout"):
        Config({"rpc_timeout": "soon"}).settings  # noqa: B018


def test_unknown_log_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="log_level"):
        Config({"log_level": "verbose"}).settings  # noqa: B018


# -- Nameko aliases -------------------------------------------------------------------


def test_design_snippet_config_with_nameko_keys() -> None:
    config = Config(
        {
            "AMQP_URI": "amqp://guest:guest@localhost:5672/",
            "LOG_LEVEL": "INFO",
            "SERVICE_TIMEOUT": 30,
        }
    )
    settings = config.settings
    assert settings.broker == "amqp://guest:guest@localhost:5672/"
    assert settings.rpc_timeout == 30.0
    assert settings.log_level == "INFO"


def test_cli_broker_beats_an_amqp_uri_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "nameko.yaml", "AMQP_URI: amqp://guest:guest@rabbit/\n")
    assert Config.load(path, environ={}).settings.broker == "amqp://guest:guest@rabbit/"
    config = Config.load(path, environ={}, overrides={"broker": "memory://cli"})
    assert config.settings.broker == "memory://cli"
    config = Config.load(path, environ={"BASIDIA_BROKER": "memory://env"})
    assert config.settings.broker == "memory://env"


def test_aliases_in_the_environment_beat_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "basidia.yaml", "broker: memory://file\nrpc_timeout: 10\n")
    settings = Config.load(
        path,
        environ={"BASIDIA_AMQP_URI": "amqp://rabbit/", "BASIDIA_SERVICE_TIMEOUT": "5"},
    ).settings
    assert settings.broker == "amqp://rabbit/"
    assert settings.rpc_timeout == 5.0


# -- secrets --------------------------------------------------------------------------


def test_config_repr_hides_the_broker_password() -> None:
    config = Config({"broker": f"amqp://guest:{SENTINEL}@rabbit:5672/"})
    text = repr(config)
    assert SENTINEL not in text
    assert "amqp://guest:***@rabbit:5672/" in text
    assert SENTINEL not in str(config)


def test_config_repr_hides_values_of_secret_keys() -> None:
    config = Config(
        {
            "database": {"url": "sqlite:///users.db", "password": SENTINEL},
            "api_token": SENTINEL,
            "CLIENT_SECRET": SENTINEL,
            "aws": {"credentials": SENTINEL, "private_key": SENTINEL},
            "user": "ada",
        }
    )
    text = repr(config)
    assert SENTINEL not in text
    assert "'user': 'ada'" in text  # everything else stays readable
    assert "sqlite:///users.db" in text
    # The values are still there for the code that needs them.
    assert config["database.password"] == SENTINEL


def test_settings_repr_hides_the_broker_password() -> None:
    settings = Config({"AMQP_URI": f"amqp://guest:{SENTINEL}@rabbit/"}).settings
    assert SENTINEL not in repr(settings)
    assert SENTINEL not in str(settings)
    assert "amqp://guest:***@rabbit/" in repr(settings)
    assert settings.broker == f"amqp://guest:{SENTINEL}@rabbit/"


def test_secrets_from_files_and_environment_stay_hidden(tmp_path: Path) -> None:
    path = write(tmp_path / "basidia.yaml", "broker: ${BROKER_URL}\ndatabase:\n  password: x\n")
    config = Config.load(
        path,
        environ={
            "BROKER_URL": f"nats://app:{SENTINEL}@nats:4222",
            "BASIDIA_DATABASE__PASSWORD": SENTINEL,
        },
    )
    assert SENTINEL not in repr(config)
    assert SENTINEL not in repr(config.settings)


def test_unsupported_broker_error_hides_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        broker_from_url(f"mqtt://app:{SENTINEL}@mosquitto:1883")
    assert SENTINEL not in str(caught.value)
    assert "memory://" in str(caught.value)  # says what would work


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (f"amqp://guest:{SENTINEL}@host/", "amqp://guest:***@host/"),
        (f"amqp://guest:{SENTINEL}@host:5672/vhost", "amqp://guest:***@host:5672/vhost"),
        (f"nats://:{SENTINEL}@host:4222", "nats://:***@host:4222"),
        ("amqp://guest@host/", "amqp://guest@host/"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("memory://", "memory://"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_config_repr_hides_numeric_secrets() -> None:
    assert "918273645" not in repr(Config({"database": {"password": 918273645}}))


def test_config_repr_hides_mappings_under_secret_keys() -> None:
    assert SENTINEL not in repr(Config({"secrets": {"stripe": SENTINEL}}))


def test_config_repr_hides_passwords_in_lists_of_urls() -> None:
    config = Config({"servers": [f"nats://app:{SENTINEL}@n1:4222", "nats://n2:4222"]})
    assert SENTINEL not in repr(config)


def test_redact_url_survives_a_malformed_port() -> None:
    url = f"amqp://guest:{SENTINEL}@rabbit:56720000/"
    assert SENTINEL not in redact_url(url)
    assert SENTINEL not in repr(Config({"broker": url}))


def test_redact_url_hides_a_nats_token() -> None:
    assert SENTINEL not in redact_url(f"nats://{SENTINEL}@nats:4222")
