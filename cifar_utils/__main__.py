"""``python -m cifar_utils COMMAND``: see :mod:`cifar_utils.cli`."""

import os
import sys

from .cli import main

os.environ.setdefault("MPLBACKEND", "Agg")  # files only, never a window
sys.exit(main())
