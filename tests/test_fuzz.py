"""The short profile of bench/fuzz.py (``python -m bench.fuzz --examples 2000`` is the long one): generated tables
through every reader, generated run state through ``icm report`` and generated option values through every
command's validation; each run exits 0 with valid output, or 2 with one line and every file as it was."""

from __future__ import annotations

import pytest
from hypothesis import settings

from bench.fuzz import PROFILE, PROPERTIES

SHORT = settings(PROFILE, max_examples=15, derandomize=True)  # seconds, reproducible


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_fuzz_short_profile(name):
    SHORT(PROPERTIES[name])()
