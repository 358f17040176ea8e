"""``python -m tsds_interp.attribution``: see :mod:`tsds_interp.cli.attribution`."""

import sys

from tsds_interp.cli.attribution import main

if __name__ == "__main__":
    sys.exit(main())
