"""`python -m pricing_cli`: the same as the `pricectl` command."""

from pricing_cli.cli import entry

entry()
