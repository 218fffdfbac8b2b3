"""``python -m moelora ...`` is the ``moelora`` console script."""

import sys

from .cli import main

sys.argv[0] = "moelora"  # usage lines say `moelora`, not `__main__.py`
sys.exit(main())
