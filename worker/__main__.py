"""``python -m worker …`` (and ``torchrun … -m worker train job.yaml``): the ``ivon-diag`` command line."""

import sys

from worker import distributed
from worker.cli import main

code = main()
if distributed.under_torchrun():
    distributed.exit_rank(code or 0)
sys.exit(code)
