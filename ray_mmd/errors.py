"""The one error type for user mistakes: the CLI prints its message on one line, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad URL, missing file, bad config value).

    The message names the problem and the fix, in one line.
    """
