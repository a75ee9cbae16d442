import signal
import sys

# A Ctrl-C while torch and the rest are imported waits until they are: a library may catch it mid-import, or turn it
# into another error, and it must end the command in one line like any other Ctrl-C
MASKABLE = hasattr(signal, "pthread_sigmask")  # POSIX
if MASKABLE:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
try:
    from tplab.cli import main
    from tplab.comm.torchrun import report_errors_to_torchrun
    if MASKABLE:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one that came meanwhile is raised here
except KeyboardInterrupt:
    print("interrupted: tplab stopped before any rank started; nothing was recorded", file=sys.stderr)
    sys.exit(130)

sys.exit(report_errors_to_torchrun(main)())
