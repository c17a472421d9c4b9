"""``python -m common.reports``: the report command (``c2f-report``)."""

from common.reports.report import main

if __name__ == "__main__":
    main()
