"""``python -m tsds_interp.verify``: see :mod:`tsds_interp.cli.verify`."""

import sys

from tsds_interp.cli.verify import main

if __name__ == "__main__":
    sys.exit(main())
