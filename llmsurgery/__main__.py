"""`python -m llmsurgery` runs the command line, like the `llmsurgery` script."""

from .cli import run

run()
