"""`python -m cidistill ...` is the `cidistill` command."""
from cidistill.app.cli import cli

cli()
