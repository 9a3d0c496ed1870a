"""``python -m geproxy``: the same as the ``geproxy`` command."""

from .cli import main

raise SystemExit(main())
