"""`python -m bnsurgery`: the same as the `bnsurgery` console script."""

from bnsurgery.cli.main import run

run()
