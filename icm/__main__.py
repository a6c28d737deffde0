"""``python -m icm`` (and ``accelerate launch -m icm``): the ``icm`` command line."""

from icm.cli import app

app()
