"""``python -m quicksilver``: the same as the ``quicksilver`` command."""

from .cli import main

raise SystemExit(main())
