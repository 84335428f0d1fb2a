"""``python -m fedsq_fast.experiments``: an alias of ``fedsq-fast suite``."""
import sys

from .cli import main

sys.exit(main())
