"""``python -m mmn ...``: the same as the ``mmn`` console command."""

import sys

from mmn.cli import main

if __name__ == "__main__":
    sys.exit(main())
