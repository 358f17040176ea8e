"""``python -m tsds_interp.patch``: see :mod:`tsds_interp.cli.patch`."""

import sys

from tsds_interp.cli.patch import main

if __name__ == "__main__":
    sys.exit(main())
