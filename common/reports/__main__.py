"""``python -m common.reports``: the report command (``c2f-report``)."""

import sys

from common.reports.report import main

# Imports the command alone needs are inside its functions: --help answers without loading torch.

if __name__ == "__main__":
    sys.exit(main())
