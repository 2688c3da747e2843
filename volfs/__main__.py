"""``python -m volfs``: the same as the ``volfs`` command."""

import sys

from volfs.daemon import main

sys.exit(main())
