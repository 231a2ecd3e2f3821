"""The service configuration (`agent run --config cell.toml`): typed dataclasses loaded from TOML.

Every problem is reported as :class:`ConfigError` naming the file and the key (``mqtt.port``,
``cells[1].id``); unknown keys are errors too (a typo must not silently fall back to a default).
deploy/cell.toml is a complete, commented example.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.contract import DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_POSE_TOLERANCE_S, ContractError, check_id

DEFAULT_PREVIEW_PORT = 8090  # [preview] port when the table leaves it out


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "edge-agent"  # each cell connects as "<client_id>.<cell>" (one last will per cell)
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5  # exponential backoff between connection attempts: min, doubling up to max
    reconnect_max_s: float = 30.0


@dataclass(frozen=True)
class CellConfig:
    id: str
    default_recipe: str | None = None  # frames of parts that were not started start them with this recipe


@dataclass(frozen=True)
class ServiceConfig:
    cells: tuple[CellConfig, ...]
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    pose_tolerance_s: float = DEFAULT_POSE_TOLERANCE_S
    pose_wait_s: float = 0.25  # how long a frame without a matching pose waits for one
    pose_history: int = 256  # robot poses kept per camera
    part_timeout_s: float = 30.0  # a part with no frame for this long is finalised
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    allowed_image_dirs: tuple[Path, ...] = ()
    inbound_queue: int = 64  # inbound messages read from MQTT but not yet dispatched
    view_queue: int = 16  # paired views waiting for a worker (all parts together)
    outbound_queue: int = 1024  # messages waiting to be published
    database_url: str | None = None  # None: the storage package's default
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9108  # None: no metrics HTTP server; 0: any free port
    recipes_dir: Path = Path("recipes")
    workers: int = 1  # threads running PartInspection.add_view / finalise
    shutdown_grace_s: float = 10.0  # on SIGTERM, how long parts in flight may take to finish their queued views
    finalised_memory: int = 10_000  # finalised part ids remembered per cell (redelivered messages are ignored)
    artifacts_dir: Path | None = None  # per-part files (verdict, anomaly volume, maps, views) under <dir>/<cell>/<part_id>/; None: none
    preview_host: str = "0.0.0.0"  # live WebRTC preview (agent.preview): off unless [preview] is in the file
    preview_port: int | None = None  # None: no preview; 0: any free port
    preview_fps: float = 5.0  # most pictures a second per viewer
    preview_max_viewers: int = 8  # viewers at once (each costs one VP8 encoder)


_SECTIONS: dict[str, dict[str, str]] = {
    # section -> {toml key: ServiceConfig attribute}
    "pairing": {"tolerance_ms": "pose_tolerance_s", "wait_ms": "pose_wait_s", "history": "pose_history"},
    "parts": {"timeout_s": "part_timeout_s", "finalised_memory": "finalised_memory"},
    "limits": {"max_payload_bytes": "max_payload_bytes"},
    "image_uri": {"allowed_dirs": "allowed_image_dirs"},
    "queues": {"inbound": "inbound_queue", "views": "view_queue", "outbound": "outbound_queue"},
    "database": {"url": "database_url"},
    "metrics": {"host": "metrics_host", "port": "metrics_port", "enabled": ""},
    "recipes": {"dir": "recipes_dir"},
    "workers": {"count": "workers", "shutdown_grace_s": "shutdown_grace_s"},
    "artifacts": {"dir": "artifacts_dir"},
    "preview": {"enabled": "", "host": "preview_host", "port": "preview_port", "fps": "preview_fps", "max_viewers": "preview_max_viewers"},
}


def load_config(path: str | Path) -> ServiceConfig:
    """Read and validate a TOML service configuration. Relative paths are relative to the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return config_from_dict(raw, base_dir=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> ServiceConfig:
    """Validate a parsed configuration (the TOML's tables as dicts)."""
    base_dir = base_dir or Path.cwd()
    known = {"mqtt", "cells", *_SECTIONS}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key {key!r} (known: {', '.join(sorted(known))})")

    mqtt_raw = _table(raw, "mqtt")
    _no_unknown(mqtt_raw, "mqtt", MqttConfig.__dataclass_fields__)
    mqtt = MqttConfig(
        host=_str(mqtt_raw, "mqtt", "host", MqttConfig.host),
        port=_int(mqtt_raw, "mqtt", "port", MqttConfig.port, 1, 65535),
        client_id=_id(mqtt_raw, "mqtt", "client_id", MqttConfig.client_id),
        username=_str(mqtt_raw, "mqtt", "username", None),
        password=_str(mqtt_raw, "mqtt", "password", None),
        keepalive_s=_int(mqtt_raw, "mqtt", "keepalive_s", MqttConfig.keepalive_s, 5, 65535),
        reconnect_min_s=_float(mqtt_raw, "mqtt", "reconnect_min_s", MqttConfig.reconnect_min_s, 0.01),
        reconnect_max_s=_float(mqtt_raw, "mqtt", "reconnect_max_s", MqttConfig.reconnect_max_s, 0.01),
    )
    if mqtt.password is not None and mqtt.username is None:
        raise ConfigError("key 'mqtt.password' is set but 'mqtt.username' is not")
    if mqtt.reconnect_max_s < mqtt.reconnect_min_s:
        raise ConfigError(f"key 'mqtt.reconnect_max_s' ({mqtt.reconnect_max_s}) must be >= 'mqtt.reconnect_min_s' ({mqtt.reconnect_min_s})")

    cells_raw = raw.get("cells")
    if not isinstance(cells_raw, list) or not cells_raw:
        raise ConfigError("key 'cells' is required: at least one [[cells]] table with an 'id'")
    cells = []
    for i, c in enumerate(cells_raw):
        where = f"cells[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(f"key {where!r} must be a table")
        _no_unknown(c, where, CellConfig.__dataclass_fields__)
        if "id" not in c:
            raise ConfigError(f"key '{where}.id' is required")
        cells.append(CellConfig(id=_id(c, where, "id", None), default_recipe=_id(c, where, "default_recipe", None)))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"key 'cells': cell ids must be unique, got {ids}")

    values: dict[str, Any] = {}
    for section, keys in _SECTIONS.items():
        table = _table(raw, section)
        _no_unknown(table, section, keys)
        for key in table:
            values[f"{section}.{key}"] = table[key]

    def get(name: str, default: Any) -> Any:
        return values.get(name, default)

    d = ServiceConfig(cells=(CellConfig("x"),))  # defaults
    metrics_enabled = get("metrics.enabled", True)
    if not isinstance(metrics_enabled, bool):
        raise ConfigError(f"key 'metrics.enabled' must be true or false, got {metrics_enabled!r}")
    metrics_port = _int(values, "", "metrics.port", d.metrics_port, 0, 65535)
    allowed = get("image_uri.allowed_dirs", [])
    if not isinstance(allowed, list) or not all(isinstance(a, str) and a for a in allowed):
        raise ConfigError(f"key 'image_uri.allowed_dirs' must be a list of directory paths, got {allowed!r}")
    allowed_dirs = []
    for i, a in enumerate(allowed):
        p = (base_dir / a) if not Path(a).is_absolute() else Path(a)
        if not p.is_dir():
            raise ConfigError(f"key 'image_uri.allowed_dirs[{i}]': {str(p)!r} is not a directory")
        allowed_dirs.append(p.resolve())
    recipes_dir = _str(values, "", "recipes.dir", None)
    db_url = _str(values, "", "database.url", None)
    artifacts_dir = _str(values, "", "artifacts.dir", None)
    preview_enabled = get("preview.enabled", "preview" in raw)  # a [preview] table turns it on unless enabled = false
    if not isinstance(preview_enabled, bool):
        raise ConfigError(f"key 'preview.enabled' must be true or false, got {preview_enabled!r}")
    preview_port = _int(values, "", "preview.port", DEFAULT_PREVIEW_PORT, 0, 65535)
    return ServiceConfig(
        cells=tuple(cells),
        mqtt=mqtt,
        pose_tolerance_s=_float(values, "", "pairing.tolerance_ms", d.pose_tolerance_s * 1000, 0.0) / 1000,
        pose_wait_s=_float(values, "", "pairing.wait_ms", d.pose_wait_s * 1000, 0.0) / 1000,
        pose_history=_int(values, "", "pairing.history", d.pose_history, 1, 1_000_000),
        part_timeout_s=_float(values, "", "parts.timeout_s", d.part_timeout_s, 0.01),
        finalised_memory=_int(values, "", "parts.finalised_memory", d.finalised_memory, 1, 10_000_000),
        max_payload_bytes=_int(values, "", "limits.max_payload_bytes", d.max_payload_bytes, 1, 2**31 - 1),
        allowed_image_dirs=tuple(allowed_dirs),
        inbound_queue=_int(values, "", "queues.inbound", d.inbound_queue, 1, 1_000_000),
        view_queue=_int(values, "", "queues.views", d.view_queue, 1, 1_000_000),
        outbound_queue=_int(values, "", "queues.outbound", d.outbound_queue, 1, 10_000_000),
        database_url=db_url,
        metrics_host=_str(values, "", "metrics.host", d.metrics_host),
        metrics_port=metrics_port if metrics_enabled else None,
        recipes_dir=d.recipes_dir if recipes_dir is None else (base_dir / recipes_dir if not Path(recipes_dir).is_absolute() else Path(recipes_dir)),
        workers=_int(values, "", "workers.count", d.workers, 1, 256),
        shutdown_grace_s=_float(values, "", "workers.shutdown_grace_s", d.shutdown_grace_s, 0.0),
        artifacts_dir=None if artifacts_dir is None else (base_dir / artifacts_dir if not Path(artifacts_dir).is_absolute() else Path(artifacts_dir)),
        preview_host=_str(values, "", "preview.host", d.preview_host),
        preview_port=preview_port if preview_enabled else None,
        preview_fps=_float(values, "", "preview.fps", d.preview_fps, 0.1),
        preview_max_viewers=_int(values, "", "preview.max_viewers", d.preview_max_viewers, 1, 64),
    )


# ------------------------------------------------------------------------------------------ helpers


def _name(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _table(raw: dict, key: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"key {key!r} must be a table ([{key}]), got {type(value).__name__}")
    return value


def _no_unknown(table: dict, section: str, known: Any) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"unknown key {_name(section, key)!r} (known: {', '.join(sorted(known))})")


def _str(table: dict, section: str, key: str, default: str | None) -> str | None:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"key {_name(section, key)!r} must be a non-empty string, got {value!r}")
    return value


def _id(table: dict, section: str, key: str, default: str | None) -> str | None:
    value = _str(table, section, key, default)
    if value is None:
        return None
    try:
        return check_id(value, _name(section, key))
    except ContractError as e:
        raise ConfigError(f"key {_name(section, key)!r}: {e.message}") from None


def _int(table: dict, section: str, key: str, default: int | None, lo: int, hi: int) -> int | None:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"key {_name(section, key)!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _float(table: dict, section: str, key: str, default: float, lo: float) -> float:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < lo:
        raise ConfigError(f"key {_name(section, key)!r} must be a finite number >= {lo}, got {value!r}")
    return float(value)
