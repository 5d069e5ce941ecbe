"""The `finegates` command line: a thin layer over the Python API (`app`).

The app and its error handling live in app.py; importing this package registers the commands
(train.py, commands.py) into it.
"""

from . import train, commands  # noqa: F401, I001  (registers the commands: train first)
from .app import app, fail, main, run_guarded

__all__ = ["app", "fail", "main", "run_guarded"]
