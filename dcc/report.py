"""``python -m dcc.report``: the command keeps its name; the report lives in :mod:`dcc.sweeps.report`."""

import sys

from dcc.sweeps.report import main

if __name__ == "__main__":
    sys.exit(main())
