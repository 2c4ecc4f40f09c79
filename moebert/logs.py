"""How the command-line entry points show what the library says. The library never prints: it logs, under the
`moebert` logger (the training modules through accelerate's logger, so a message comes once, from the main process,
unless it concerns each process); every script calls `show_logs()` first, which writes those messages to stderr, one
line each, and leaves stdout to the script's own results."""

import logging
import sys

CONSOLE = "moebert-console"  # the name of the handler show_logs installs


def show_logs(level: int = logging.INFO):
    """Write the library's messages of `level` and above to stderr (the stderr of now: a second call rebinds it), and
    only there: a library that configures the root logger (onnxruntime's quantizer does, on import) would repeat
    each of them in its own format."""
    logger = logging.getLogger("moebert")
    logger.setLevel(level)
    logger.propagate = False
    for handler in [h for h in logger.handlers if h.get_name() == CONSOLE]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(CONSOLE)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
