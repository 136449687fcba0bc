"""The one exception type users see.

Library code raises :class:`ZhllamaError` for problems the user can fix (a missing file, a
tokenizer that does not fit a model, a bad flag). Its message is one line that says what and
where, and ideally how to fix it. Only the CLI turns it into ``zhllama: error: ...`` and a
non-zero exit; notebooks get the exception.
"""


class ZhllamaError(Exception):
    """A problem with the user's input or environment, described in one line."""

    def __str__(self) -> str:  # keep the CLI's promise of one line
        return " ".join(super().__str__().split("\n"))
