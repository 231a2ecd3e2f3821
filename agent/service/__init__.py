"""The MQTT edge-agent service: `agent run --config cell.toml` (see service.py for its shape)."""

from agent.service.config import CellConfig, ConfigError, MqttConfig, ServiceConfig, config_from_dict, load_config
from agent.service.metrics import ServiceMetrics
from agent.service.pairing import PosePairing
from agent.service.service import InspectionService, InspectorFactory, list_recipes, serve
from agent.service.store import ResultStore

__all__ = [
    "CellConfig",
    "ConfigError",
    "InspectionService",
    "InspectorFactory",
    "MqttConfig",
    "PosePairing",
    "ResultStore",
    "ServiceConfig",
    "ServiceMetrics",
    "config_from_dict",
    "list_recipes",
    "load_config",
    "serve",
]
