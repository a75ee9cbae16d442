import sys

from tplab.cli import main
from tplab.comm.torchrun import report_errors_to_torchrun

sys.exit(report_errors_to_torchrun(main)())
