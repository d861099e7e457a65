"""Configuration: CLI options > environment (``BASIDIA_*``) > config file > defaults.

Keys are looked up by dotted path and case-insensitively, so ``LOG_LEVEL``,
``log_level`` and ``BASIDIA_LOG_LEVEL`` name the same setting, and
``BASIDIA_DATABASE__URL`` sets ``database.url``.  Config files are YAML or TOML;
string values may use ``${VAR}`` or ``${VAR:default}``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basidia._speedups import DEFAULT_MAX_FRAME_SIZE, HARD_MAX_FRAME_SIZE
from basidia._wire import known_serializer
from basidia.brokers import redact_url
from basidia.errors import ConfigError

__all__ = ["Config", "Settings"]

ENV_PREFIX = "BASIDIA_"
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")
_SECRET_KEY = re.compile(r"pass|secret|token|credential|private", re.IGNORECASE)
_MISSING = object()


# Only text that reads back unchanged becomes a number: "0042", "1_000" or "Infinity"
# (a PIN, an id, a password) stay strings.
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


# Settings that are always text, however they look: never read as numbers or booleans
# from the environment or a whole-value ``${VAR}`` (a token "0" must not turn
# authentication off, nor "1e3" become 1000.0).  Dotted, lower-case keys.
TEXT_KEYS = frozenset({"http.token", "dedup_store"})


def _scalar(text: str) -> Any:
    """Read an environment or substituted value as a bool, number or string."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def _substitute(value: Any, environ: Mapping[str, str], key: str = "") -> Any:
    """Replace ``${VAR:default}`` in every string of ``value`` (found at dotted ``key``)."""
    if isinstance(value, str):
        whole = _VARIABLE.fullmatch(value)
        if whole is not None:
            found = environ.get(whole.group(1), whole.group(2))
            if found is None:
                raise ConfigError(f"environment variable {whole.group(1)} is not set")
            return found if key in TEXT_KEYS else _scalar(found)

        def replace(match: re.Match[str]) -> str:
            found = environ.get(match.group(1), match.group(2))
            if found is None:
                raise ConfigError(f"environment variable {match.group(1)} is not set")
            return found

        return _VARIABLE.sub(replace, value)
    if isinstance(value, dict):
        return {
            name: _substitute(item, environ, f"{key}.{name}".lower() if key else str(name).lower())
            for name, item in value.items()
        }
    if isinstance(value, list):
        return [_substitute(item, environ) for item in value]
    return value


# Setting name → keys accepted for it, first found wins (Nameko-compatible aliases).
_ALIASES: dict[str, tuple[str, ...]] = {
    "broker": ("broker", "broker_url", "amqp_uri"),
    "rpc_timeout": ("rpc_timeout", "service_timeout"),
}


def _layer(below: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a higher-precedence layer: a setting it names under any alias hides every
    alias of that setting below (env ``BASIDIA_AMQP_URI`` beats a file's ``broker``)."""
    top_keys = {key.lower() for key in top}
    for aliases in _ALIASES.values():
        if top_keys.intersection(aliases):
            below = {k: v for k, v in below.items() if k.lower() not in aliases}
    return _merge(below, top)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``top`` over ``base``, matching keys case-insensitively."""
    merged = dict(base)
    lowered = {key.lower(): key for key in merged}
    for key, value in top.items():
        existing = lowered.get(key.lower(), key)
        if isinstance(value, Mapping) and isinstance(merged.get(existing), dict):
            merged[existing] = _merge(merged[existing], value)
        else:
            merged.pop(existing, None)
            merged[key] = dict(value) if isinstance(value, Mapping) else value
            lowered[key.lower()] = key
    return merged


def _nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` → ``{"a": {"b": 1}}``."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _redacted(value: Any, key: str = "") -> Any:
    """``value`` with secrets hidden: everything under a secret-looking key, URL passwords."""
    if key and _SECRET_KEY.search(key) and value is not None:
        return "***"
    if isinstance(value, Mapping):
        return {k: _redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(item) for item in value]
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


class Config(Mapping[str, Any]):
    """Configuration values, looked up by dotted, case-insensitive keys."""

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = _merge({}, data or {})

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        base: Mapping[str, Any] | None = None,
    ) -> Config:
        """Layer ``base`` < config file < ``BASIDIA_*`` environment < ``overrides``.

        ``overrides`` (CLI options) may use dotted keys.
        """
        environ = os.environ if environ is None else environ
        env_values: dict[str, Any] = {}
        for name, text in environ.items():
            if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
                key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
                env_values[key] = text if key in TEXT_KEYS else _scalar(text)
        layers: list[Mapping[str, Any]] = [base or {}]
        if path is not None:
            layers.append(_read_file(Path(path), environ))
        layers.append(_nest(env_values))
        layers.append(_nest(dict(overrides or {})))
        data: dict[str, Any] = {}
        for layer in layers:
            data = _layer(data, layer)
        return cls(data)

    def get(self, key: str, default: Any = None) -> Any:
        """The value at dotted ``key`` (``"database.url"``), or ``default``."""
        value: Any = self._data
        for part in key.split("."):
            if not isinstance(value, Mapping):
                return default
            found = value.get(part, _MISSING)
            if found is _MISSING:
                lowered = part.lower()
                found = next((v for k, v in value.items() if k.lower() == lowered), _MISSING)
                if found is _MISSING:
                    return default
            value = found
        return value

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, _MISSING) is not _MISSING

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def merged(self, other: Mapping[str, Any]) -> Config:
        """A new config with ``other`` (dotted keys allowed) over this one."""
        return Config(_layer(self._data, _nest(dict(other))))

    def to_dict(self) -> dict[str, Any]:
        """The values as a plain nested dict (secrets included: do not log it)."""
        return _merge({}, self._data)

    def __repr__(self) -> str:
        return f"Config({_redacted(self._data)!r})"

    @property
    def settings(self) -> Settings:
        """Basidia's own settings, validated."""
        return Settings.from_config(self)


def _read_file(path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"{path} is YAML: install PyYAML (pip install 'basidia[yaml]') or use TOML"
                ) from None
            data = yaml.safe_load(text) or {}
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    substituted: dict[str, Any] = _substitute(data, environ)
    return substituted


@dataclass(frozen=True)
class Settings:
    """Basidia's own settings with their defaults."""

    #: Broker URL: ``memory://`` (in-process), ``amqp://...``, ``nats://...``.
    broker: str = "memory://"
    #: Seconds an RPC call may take, its deadline; nested calls inherit what is left.
    rpc_timeout: float = 30.0
    #: Calls each service handles at once (a service's ``max_workers`` overrides it).
    max_workers: int = 64
    #: Payload format: ``msgpack``, ``json`` or a registered serializer's name.
    serializer: str = "msgpack"
    #: Seconds the calls in flight get to finish on SIGTERM (``basidia run --grace``).
    shutdown_grace: float = 20.0
    #: Attempts an event handler gets before the event is dead-lettered
    #: (``@event_handler(..., max_attempts=N)`` or ``retry=Retry(...)`` per handler).
    event_max_attempts: int = 5
    #: Seconds before the first retry of a failed event; each later wait is
    #: ``event_retry_multiplier`` times longer, up to ``event_retry_max_delay``.
    event_retry_delay: float = 1.0
    #: Growth of the wait between an event's attempts (exponential backoff).
    event_retry_multiplier: float = 2.0
    #: Longest wait between two attempts of an event, in seconds.
    event_retry_max_delay: float = 60.0
    #: Random spread of each wait, a fraction (0.2: ±20 %), so retries do not come in waves.
    event_retry_jitter: float = 0.2
    #: Where event handlers remember the idempotency keys they handled, to run once per key:
    #: ``memory`` (this process), a ``redis://`` URL (every process), or ``off``.
    dedup_store: str = "memory"
    #: Seconds a handled idempotency key is remembered by the deduplication store.
    dedup_window: float = 600.0
    #: Seconds a handler's claim on a key lasts while it runs (a crashed one lapses).
    dedup_lease: float = 300.0
    #: Attempts of an RPC call through a ``Dependency`` where retrying is safe (the request
    #: never reached a handler, or the method is declared idempotent); 1: no retries.
    rpc_retry_attempts: int = 3
    #: Seconds before the first retry of an RPC call, doubled for each later one.
    rpc_retry_delay: float = 0.05
    #: Consecutive failed calls that open a ``Dependency``'s circuit breaker (0: never on
    #: consecutive failures).
    breaker_failures: int = 5
    #: Failure rate (0 to 1) over ``breaker_window`` that opens the breaker, once the window
    #: holds ``breaker_min_calls`` calls (0: never on the rate).
    breaker_failure_rate: float = 0.5
    #: Seconds of calls the breaker's failure rate is measured over.
    breaker_window: float = 30.0
    #: Calls in the window before the failure rate counts.
    breaker_min_calls: int = 20
    #: Seconds an open breaker fails calls at once before letting one probe through.
    breaker_reset: float = 5.0
    #: Calls in flight at once through one ``Dependency`` (its bulkhead; 0: unbounded).
    bulkhead_max_calls: int = 100
    #: Seconds a call waits for a free place in the bulkhead before ``BulkheadFull``.
    bulkhead_max_wait: float = 1.0
    #: Largest frame sent or accepted, in bytes (1024 to 16 MiB).
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    #: Send a failing handler's traceback to its callers (``RemoteError.traceback``):
    #: off in production, where it may tell too much; on in tests and ``basidia shell``.
    remote_tracebacks: bool = False
    #: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL``.
    log_level: str = "INFO"
    #: ``text`` or ``json`` (one JSON object per line).
    log_format: str = "text"
    #: Options passed to the broker adapter (docs/rabbitmq.md, docs/nats.md).
    broker_options: dict[str, Any] = field(default_factory=dict)
    #: Broker URL for events, when they go to another broker than RPC (docs/brokers.md);
    #: empty: ``broker`` carries both.
    event_broker: str = ""
    #: Options passed to the events broker's adapter.
    event_broker_options: dict[str, Any] = field(default_factory=dict)
    #: Seconds between two announcements of a process's services in the service
    #: directory (``basidia services``, docs/operations.md).
    directory_heartbeat: float = 5.0
    #: Seconds an announcement holds: an instance not heard of for this long (a killed
    #: process) leaves the directory.  More than ``directory_heartbeat``.
    directory_expiry: float = 15.0
    #: A service that fails to start stops every service of the runner and the runner
    #: raises (``basidia run --fail-fast``); off, it stays in ERROR and the others run.
    fail_fast: bool = False

    def __repr__(self) -> str:
        return (
            f"Settings(broker={redact_url(self.broker)!r}, rpc_timeout={self.rpc_timeout}, "
            f"max_workers={self.max_workers}, serializer={self.serializer!r})"
        )

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        """Read and check the settings in ``config``."""
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            for key in _ALIASES.get(name, (name,)):
                value = config.get(key, _MISSING)
                if value is not _MISSING:
                    values[name] = value
                    break
        converted: dict[str, Any] = {}
        for name, value in values.items():
            kind = _SETTING_TYPES[name]
            try:
                converted[name] = kind(value)
            except (TypeError, ValueError):
                what = _TYPE_NAMES.get(kind, "text")
                raise ConfigError(f"{name} must be {what}, got {value!r}") from None
        if "log_level" in converted:
            converted["log_level"] = converted["log_level"].upper()
        settings = cls(**converted)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ``ConfigError`` for out-of-range values."""
        if not 0 < self.rpc_timeout <= 24 * 3600:
            raise ConfigError(f"rpc_timeout must be in (0, 86400] seconds, got {self.rpc_timeout}")
        if self.max_workers < 1:
            raise ConfigError(f"max_workers must be at least 1, got {self.max_workers}")
        if not known_serializer(self.serializer):
            raise ConfigError(
                f"serializer must be 'msgpack', 'json' or one registered with "
                f"basidia.register_serializer, got {self.serializer!r}"
            )
        if self.shutdown_grace < 0:
            raise ConfigError(f"shutdown_grace must be >= 0, got {self.shutdown_grace}")
        if self.event_max_attempts < 1:
            raise ConfigError("event_max_attempts must be at least 1")
        self._check_resilience()
        if not 1024 <= self.max_frame_size <= HARD_MAX_FRAME_SIZE:
            raise ConfigError(
                f"max_frame_size must be between 1024 and {HARD_MAX_FRAME_SIZE} bytes"
            )
        if self.log_level not in _LOG_LEVELS:
            levels = ", ".join(sorted(_LOG_LEVELS))
            raise ConfigError(f"log_level must be one of {levels}, got {self.log_level!r}")
        if not 0 < self.directory_heartbeat <= 3600:
            raise ConfigError(
                f"directory_heartbeat must be in (0, 3600] seconds, got {self.directory_heartbeat}"
            )
        if not self.directory_heartbeat < self.directory_expiry <= 24 * 3600:
            raise ConfigError(
                "directory_expiry must be more than directory_heartbeat "
                f"({self.directory_heartbeat} s) and at most 86400 s, got {self.directory_expiry}"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")

    def _check_resilience(self) -> None:
        at_least = {
            "event_retry_delay": 0.0,
            "event_retry_max_delay": 0.0,
            "event_retry_multiplier": 1.0,
            "dedup_window": 0.0,
            "dedup_lease": 0.001,
            "rpc_retry_attempts": 1,
            "rpc_retry_delay": 0.0,
            "breaker_failures": 0,
            "breaker_failure_rate": 0.0,
            "breaker_window": 0.001,
            "breaker_min_calls": 1,
            "breaker_reset": 0.0,
            "bulkhead_max_calls": 0,
            "bulkhead_max_wait": 0.0,
        }
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low:g}, got {getattr(self, name)}")
        if not 0 <= self.event_retry_jitter < 1:
            raise ConfigError(
                f"event_retry_jitter must be in [0, 1), got {self.event_retry_jitter}"
            )
        if self.breaker_failure_rate > 1:
            raise ConfigError(
                f"breaker_failure_rate must be in [0, 1], got {self.breaker_failure_rate}"
            )
        spec = self.dedup_store.strip().lower()
        if (
            not dedup_off(spec)
            and spec != "memory"
            and not spec.startswith(("redis://", "rediss://", "unix://"))
        ):
            raise ConfigError(
                f"dedup_store must be 'memory', 'off' or a redis:// URL, got {self.dedup_store!r}"
            )


def dedup_off(spec: str) -> bool:
    """Whether a ``dedup_store`` setting turns deduplication off."""
    return spec.strip().lower() in ("", "off", "none")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(value)


_SETTING_TYPES: dict[str, Callable[[Any], Any]] = {
    "broker": str,
    "rpc_timeout": float,
    "max_workers": int,
    "serializer": str,
    "shutdown_grace": float,
    "event_max_attempts": int,
    "event_retry_delay": float,
    "event_retry_multiplier": float,
    "event_retry_max_delay": float,
    "event_retry_jitter": float,
    "dedup_store": lambda value: "off" if value is False or value is None else str(value),
    "dedup_window": float,
    "dedup_lease": float,
    "rpc_retry_attempts": int,
    "rpc_retry_delay": float,
    "breaker_failures": int,
    "breaker_failure_rate": float,
    "breaker_window": float,
    "breaker_min_calls": int,
    "breaker_reset": float,
    "bulkhead_max_calls": int,
    "bulkhead_max_wait": float,
    "max_frame_size": int,
    "remote_tracebacks": _boolean,
    "log_level": str,
    "log_format": str,
    "broker_options": dict,
    "event_broker": str,
    "event_broker_options": dict,
    "directory_heartbeat": float,
    "directory_expiry": float,
    "fail_fast": _boolean,
}
_TYPE_NAMES: dict[object, str] = {
    int: "an integer",
    float: "a number",
    dict: "a mapping",
    _boolean: "true or false",
}
_LOG_LEVELS = frozenset({"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"})
