"""``mmn bench`` runnable from a checkout: ``python benchmarks/bench.py [--quick] [--json] [--plot FILE.png]``.

Everything lives in :mod:`benchmarks.suite`, an installed package (so ``mmn bench`` has it too).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
