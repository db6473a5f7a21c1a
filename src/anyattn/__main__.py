"""``python -m anyattn doctor | bench kernels ...``: the same as the ``anyattn`` script."""

import sys

from .cli import main

sys.exit(main(prog="python -m anyattn"))
