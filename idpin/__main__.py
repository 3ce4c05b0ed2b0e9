"""``python -m idpin``: the same as the ``idpin`` command."""
import sys

from .cli import main

sys.exit(main())
