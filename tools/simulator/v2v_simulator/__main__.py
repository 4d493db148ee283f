"""`python -m v2v_simulator` (with tools/simulator on the path; `make demo` sets it)."""

from __future__ import annotations

import sys

from .simulation import cli

if __name__ == "__main__":
    sys.exit(cli())
