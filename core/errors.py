"""The one exception type for bad user input.

Raised anywhere a user handed ferry something it cannot use (a wrong path, a malformed config, a
corrupt bundle, an unknown backend, an over-long input). The message is one line that says what
was expected, what was found and how to fix it; the CLI prints it and exits with status 2.
"""


class FerryError(Exception):
    """Bad input from the user: the message is shown as is, without a traceback."""
