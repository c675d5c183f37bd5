"""Shared configuration of the engine tests; shared problems live in ``_problems.py``."""

from __future__ import annotations

import sys
from pathlib import Path

# The helper module of shared problems sits beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
