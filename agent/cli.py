"""The `agent` command line. Each concern registers its own Typer sub-app here, one line each."""

from __future__ import annotations

import typer

from agent import __version__

app = typer.Typer(
    name="agent",
    help="Edge inspection agent: simulate cells, enrol recipes, inspect parts, run the MQTT service.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edge-inspection-agent {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Edge inspection agent."""


# Sub-apps (one line per concern).
from agent.sim.cli import simulate_app  # noqa: E402

app.add_typer(simulate_app, name="simulate")

from agent.service.cli import run_command  # noqa: E402

app.command("run")(run_command)

from storage.cli import results_app  # noqa: E402

app.add_typer(results_app, name="results")

from agent.pipeline_cli import enroll_command, inspect_command, recipes_app  # noqa: E402

app.add_typer(recipes_app, name="recipes")
app.command("enroll")(enroll_command)
app.command("inspect")(inspect_command)

from agent.eval.cli import eval_command  # noqa: E402

app.command("eval")(eval_command)

from agent.report.cli import report_command  # noqa: E402

app.command("report")(report_command)

from agent.demo import demo_command  # noqa: E402

app.command("demo")(demo_command)
