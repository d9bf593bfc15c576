"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix (a missing model, an unusable data folder). The text says what was found,
    what was expected and what to do; train.py prints it and exits 1."""
