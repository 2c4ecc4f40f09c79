"""search.py, with every process killed (os._exit, like a SIGKILL: nothing cleaned up) right after it wrote
$INTERRUPT_AFTER_CHUNKS chunks: lets a test stop a build of several processes part way, at a known point."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, like search.py

from moebert.search import index as search_index  # noqa: E402
import search  # noqa: E402

AFTER = int(os.environ["INTERRUPT_AFTER_CHUNKS"])
write_chunk, written = search_index._write_chunk, []


def write_then_die(*args, **kwargs):
    write_chunk(*args, **kwargs)
    written.append(args[1])
    if len(written) == AFTER:
        os._exit(9)


search_index._write_chunk = write_then_die

if __name__ == "__main__":
    search.main()
