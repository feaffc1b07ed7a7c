"""``python -m vmstore.cli``: the same as the ``vmstore`` command."""

import sys

from vmstore.cli import main

sys.exit(main())
