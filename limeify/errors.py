"""The one exception type limeify raises for user-facing problems."""


class LimeError(RuntimeError):
    """Raised when a model, config or checkpoint cannot be limeified as asked.

    The message always names what was expected, what was found and how to fix it.
    """
