"""``python -m lexvla.train --config run.yaml`` (the form ``accelerate launch -m`` and torchrun take)."""

import sys

from .cli import main

sys.exit(main())
