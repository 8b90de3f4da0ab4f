"""The one error type entry points turn into a single line.

A `UserError` is bad input the user can fix: a config key, a data file, a tokenizer, a checkpoint.
Its message is one line that names the file or key and what is wrong; entry points print it as
`error: <message>` once and exit non-zero, without a traceback.
"""


class UserError(ValueError):
    """Bad input named in one line (see the module docstring)."""


class ConfigError(UserError):
    """A configuration the run cannot start with; its message is one line for the user."""
