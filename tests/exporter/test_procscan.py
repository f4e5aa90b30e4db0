"""Engine process state from a real /proc scan: a process appears, is killed -9, disappears."""

import os
import signal
import subprocess
import sys
import time

from exporter_testlib import DEAD_PID, wait_for_cmdline

from vllm_fleet_exporter.config import ProcessClass
from vllm_fleet_exporter.procscan import scan

MARK = f"fleet-test-engine-{os.getpid()}"


def test_scan_counts_and_sees_kill_9():
    classes = [ProcessClass("engine", MARK), ProcessClass("other", r"^no-such-process-xyz$")]
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", MARK])
    try:
        wait_for_cmdline(p.pid, MARK)
        st = scan("/proc", classes, want_ns_pids=True)
        assert st.counts == {"engine": 1, "other": 0}
        assert abs(st.oldest_start["engine"] - time.time()) < 30
        assert p.pid in st.host_pids and DEAD_PID not in st.host_pids
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    st = scan("/proc", classes, want_ns_pids=False)
    assert st.counts["engine"] == 0 and "engine" not in st.oldest_start
