"""`python -m bnsurgery`: the same as the `bnsurgery` console script."""

from bnsurgery.cli import run

run()
