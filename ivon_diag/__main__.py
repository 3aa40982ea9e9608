"""``python -m ivon_diag …`` (and ``torchrun … -m ivon_diag train job.yaml``): the ``ivon-diag`` command line."""

import sys

from ivon_diag.cli import main
from worker import distributed

code = main()
if distributed.under_torchrun():
    distributed.exit_rank(code or 0)
sys.exit(code)
