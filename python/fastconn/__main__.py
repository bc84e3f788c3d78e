"""``python -m fastconn``: see :mod:`fastconn.cli`."""

from fastconn.cli import main

raise SystemExit(main())
