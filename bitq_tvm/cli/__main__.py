"""``python -m bitq_tvm.cli``: the ``bitq-tvm`` command."""

import sys

from . import main

sys.exit(main())
