"""``python -m engine.cli``: the ``attention-engine`` command."""

import sys

from . import main

sys.exit(main())
