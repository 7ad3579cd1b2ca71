"""The one exception type users see: its message is a sentence meant for them."""


class EdgetokError(Exception):
    """A user-facing error (bad input, missing file, impossible setting).

    The CLI prints its message as one line on stderr and exits non-zero, without a traceback.
    Internal bugs are not EdgetokError: they keep their traceback.

    A message names an option by its command-line flag, which is the Python name with dashes:
    `--max-new-tokens` is GenerationConfig.max_new_tokens, `--backend` is load(backend=…), and the
    KV cache's flags carry a `kv-` prefix (`--kv-budget` is KVConfig.budget; its messages say both).
    """
