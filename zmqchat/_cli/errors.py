"""What a command of the terminal client raises when it is typed wrong."""


class UsageError(Exception):
    """A command typed wrong: answered locally, nothing is sent."""
