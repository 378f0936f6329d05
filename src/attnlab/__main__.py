"""``python -m attnlab`` runs the CLI."""

from attnlab.cli.main import main

main()
