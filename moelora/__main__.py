"""``python -m moelora ...`` is the ``moelora`` console script."""

import sys

from .cli import main

sys.exit(main())
