"""``MinigptError``: the one base of every error a user can fix.

Each part of the project names its own errors (``ConfigError``, ``CheckpointError``, ``DataError``, ...) and
derives them from this class, and from the built-in they have always been (``ValueError``, ``RuntimeError``), so
that code catching those still does. A message says what is wrong and what to do about it; every command-line
tool prints it as one line (kernels/cli.py's ``run_cli``). Anything else that escapes a tool is a bug in the
project, and keeps its traceback.

It lives in ``kernels``, the package every other one imports, and imports nothing itself.
"""


class MinigptError(Exception):
    """A problem the user can fix: the message names it and says how."""
