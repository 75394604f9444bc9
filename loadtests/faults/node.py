"""`python -m realtime_safety.loadtests.faults.node serve ...`: `realtime serve` with the fault
suite's kill switch. With RT_FAULT_KILL_AT=<step> the process SIGKILLs itself the first time
the alert service reaches that step (`AlertService.checkpoint`: trigger:reserved, trigger:stored,
trigger:queued, resolve:stored, escalate:stored, deliver:sent). Only the fault suite and the
tests start nodes this way; `realtime serve` never installs the switch."""

from __future__ import annotations

import os
import signal
import sys

from realtime_safety.alerts.service import AlertService
from realtime_safety.realtime.cli import main


def _kill_at(step: str) -> None:
    if step == os.environ.get("RT_FAULT_KILL_AT"):
        sys.stderr.write(f"fault: killed at {step}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    AlertService.checkpoint = staticmethod(_kill_at)
    sys.exit(main())
