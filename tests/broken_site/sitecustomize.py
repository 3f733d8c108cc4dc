"""Runs at the start of every Python process with this directory on ``PYTHONPATH``.

With ``MMN_TEST_BROKEN`` set (a name of ``BROKEN`` there), the
process's kvm nodes are the broken kind of that name (tests/broken_kinds.py):
tests/test_soak.py starts ``mmn soak`` so, and the soak's node processes
inherit the environment.  Without it, nothing happens.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

if os.environ.get("MMN_TEST_BROKEN"):
    _path = Path(__file__).resolve().parent.parent / "broken_kinds.py"
    _spec = importlib.util.spec_from_file_location("broken_kinds", _path)
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.install(os.environ["MMN_TEST_BROKEN"])
