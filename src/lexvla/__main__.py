"""``python -m lexvla ...`` = the ``lexvla`` command (the form ``torchrun -m lexvla cal train ...`` takes)."""

import sys

from .cli import main

sys.exit(main())
