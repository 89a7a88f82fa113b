"""``python -m prune_env``: the ``prune-env`` command line."""

import sys

from prune_env.app.cli import main

sys.exit(main())
