"""`python -m cidistill ...` is the `cidistill` command."""
import sys

from cidistill.app.cli import main

sys.exit(main())
