"""`agent run --config cell.toml`: the MQTT edge-agent service."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from pathlib import Path

import typer

from agent.inspection import Inspector
from agent.service.config import ConfigError, ServiceConfig, load_config

# A "module:function" that takes the recipes directory and returns the recipe-name -> Inspector factory
# (raising KeyError/LookupError for unknown recipes). The inspection core provides the real one.
DEFAULT_INSPECTOR_LOADER = "agent.recipe:inspector_factory"

run_app = typer.Typer(help="Run the MQTT edge-agent service.", no_args_is_help=True)


@run_app.callback()
def _main() -> None:
    """The MQTT edge-agent service."""


def load_inspector_factory(spec: str, recipes_dir: Path) -> Callable[[str], Inspector]:
    """Import ``module:function`` and call it with the recipes directory."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--inspector-factory must be 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--inspector-factory {spec!r}: cannot import module {module_name!r} ({e})") from None
    loader = getattr(module, attr, None)
    if not callable(loader):
        raise ValueError(f"--inspector-factory {spec!r}: module {module_name!r} has no function {attr!r}")
    return loader(recipes_dir)


def open_store(config: ServiceConfig):
    """The results store of ``database.url`` (the storage package's default when unset), migrated to head."""
    from storage import ResultStore

    return ResultStore(config.database_url)


@run_app.command("run")
def run_command(
    config_path: Path = typer.Option(..., "--config", "-c", help="Service configuration (TOML); see deploy/cell.toml."),
    inspector_factory: str = typer.Option(
        DEFAULT_INSPECTOR_LOADER, "--inspector-factory", help="module:function(recipes_dir) returning the recipe -> Inspector factory."
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="Python logging level."),
) -> None:
    """Serve the configured cells until SIGTERM/SIGINT: frames in over MQTT, verdicts out."""
    from agent.artifacts import ArtifactWriter
    from agent.service.service import InspectionService, serve

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path)
        factory = load_inspector_factory(inspector_factory, config.recipes_dir)
        artifacts = None if config.artifacts_dir is None else ArtifactWriter(config.artifacts_dir)  # [artifacts] dir
    except (ConfigError, ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    observers = [artifacts] if artifacts is not None else []
    store = open_store(config)
    preview = None
    try:
        if config.preview_port is not None:  # [preview]: live WebRTC view of each cell (agent.preview)
            from agent.preview.server import LivePreview

            try:
                preview = LivePreview.start(config, store)
            except OSError as e:
                typer.echo(f"error: [preview] cannot serve on {config.preview_host}:{config.preview_port}: {e}", err=True)
                raise typer.Exit(2) from None
            observers.append(preview.observer)
        service = InspectionService(config, factory, store, observers=observers)
        asyncio.run(serve(service))
    finally:
        if preview is not None:
            preview.stop()
        if artifacts is not None:
            artifacts.close()
        store.close()


if __name__ == "__main__":
    run_app()
