"""python -m stdit.train {train,sample} ... (the entry point torchrun launches)."""

import sys

from .cli import main

sys.exit(main())
