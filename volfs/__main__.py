"""``python -m volfs``: the same as the ``volfs`` command."""

import sys

from volfs.daemon.main import main

sys.exit(main())
