"""What every `declic` command shares: the --config option and loading the config."""

from __future__ import annotations

import click

from ..errors import ConfigError
from ..store import Database

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    envvar="DECLIC_CONFIG",
    default="config/declic.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Deployment config file (env: DECLIC_CONFIG).",
)


def load(config_path: str):  # type: ignore[no-untyped-def]
    from ..http.app import load as load_deployment

    try:
        return load_deployment(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        raise SystemExit(2) from None


def require_current(database: Database) -> None:
    """Exit with a clear message when the deployment's database is missing or not migrated."""
    if not database.is_current():
        database.close()
        raise click.ClickException(
            "the deployment's database is not there or not current: start the deployment, or run "
            "`declic db upgrade --config FILE`"
        )
