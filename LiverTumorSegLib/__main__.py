"""``python -m LiverTumorSegLib`` is the ``livertumorseg`` command line."""

import sys

from .cli import main

sys.exit(main())
