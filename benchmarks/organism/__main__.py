"""``python -m benchmarks.organism``: run the organism benchmark (see :mod:`benchmarks.organism.bench`)."""

from __future__ import annotations

import os
import sys

# Set before torch loads: busy-waiting OpenMP threads slow everyone down on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.organism.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
