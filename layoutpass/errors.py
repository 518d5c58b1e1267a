"""Every error layoutpass raises on purpose is a LayoutPassError."""


class LayoutPassError(Exception):
    """Base class: the message names the argument, node, rule or source line at fault."""


class ArgumentError(LayoutPassError, ValueError):
    """A caller's argument is malformed (shape, dtype, range, unknown name)."""

    def __init__(self, argument: str, problem: str):
        super().__init__(f"{argument}: {problem}")
        self.argument = argument
