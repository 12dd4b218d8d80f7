"""``python -m lightweight_ckpt``: the command line (see ``lightweight_ckpt.cli``)."""

import sys

from lightweight_ckpt.cli import main

sys.exit(main())
