"""``python -m imgindex``: the ``imgindex`` command, for running it with a given interpreter
(the web app's export runner starts ``sys.executable -m imgindex export ...``)."""

from __future__ import annotations

import sys

from imgindex.cli import main

if __name__ == "__main__":
    sys.exit(main())
