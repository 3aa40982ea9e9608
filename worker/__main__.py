"""``python -m worker …`` (and ``torchrun … -m worker train job.yaml``): the ``ivon-diag`` command line."""

import sys

from worker.cli import main

sys.exit(main())
