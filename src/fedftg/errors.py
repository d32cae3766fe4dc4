"""The one exception type that reaches users as an `error:` line with exit status 2."""


class UserError(Exception):
    """Bad input from the user (config, flags, files); the message names the field or path."""
