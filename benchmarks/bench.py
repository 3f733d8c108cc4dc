"""``mmn bench`` runnable from a checkout: ``python benchmarks/bench.py [--quick] [--json] [--plot FILE.png]``.

Everything lives in :mod:`mmn.bench` (so the installed ``mmn bench`` has it too).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmn.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
