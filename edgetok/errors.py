"""The one exception type users see: its message is a sentence meant for them."""


class EdgetokError(Exception):
    """A user-facing error (bad input, missing file, impossible setting).

    The CLI prints its message as one line on stderr and exits non-zero, without a traceback.
    Internal bugs are not EdgetokError: they keep their traceback.
    """
