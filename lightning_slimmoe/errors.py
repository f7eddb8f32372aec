"""The errors a user makes and can fix: a recipe value, a corpus, a model directory that cannot work.

Each is raised before any compute, with a message that names the key to change (``teacher``,
``data.init_args.files``, ``stages.1.expert_width`` ...). The commands (``cli.run_command``) print it as one
``error:`` line and exit with status 2; ``--debug`` or ``SLIMMOE_DEBUG=1`` shows the traceback instead. Anything
else that goes wrong is not anticipated and keeps its traceback.

The classes that existed before this base (``ConfigError``, ``CorpusError``, ``UnsupportedModelError``, the
``FileNotFoundError`` of a missing path) subclass it, so code that catches them by their old names still does.
"""

from __future__ import annotations


class UserError(Exception):
    """An anticipated error in what the user gave; the message names the key to change."""


class ConfigError(UserError, ValueError):
    """A run configuration that cannot work, found before any compute."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A path the user gave (a teacher dir, a corpus file, a config JSON) that is not there."""
