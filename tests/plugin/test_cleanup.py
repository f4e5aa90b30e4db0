"""Stale-state cleanup: ownership rules proven with real /dev/shm objects, sockets and processes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from conftest import child_env
from vllm_fleet import cleanup

# A process of launch LAUNCH (env) that creates a real SharedMemory segment through the plugin's
# recording hook, plus an unrecorded segment of the same kind and a NCCL-style file (what another
# program leaves in /dev/shm), keeps them mapped, prints their paths, then sleeps until killed. It
# unregisters the segments from multiprocessing's resource tracker, so SIGKILL leaks them exactly
# like vLLM's.
OWNER = r"""
import os, sys, time, uuid
from multiprocessing import shared_memory, resource_tracker
from vllm_fleet import state
from vllm_fleet.hooks import shm
state.register_member()
shm._record_shm_segments()
rec = shared_memory.SharedMemory(create=True, size=4096)
resource_tracker.unregister(rec._name, "shared_memory")
orig = shared_memory.SharedMemory.__init__.__wrapped__  # vLLM's unwrapped call: not recorded
unrec = shared_memory.SharedMemory.__new__(shared_memory.SharedMemory)
orig(unrec, None, True, 4096)
resource_tracker.unregister(unrec._name, "shared_memory")
nccl = "/dev/shm/nccl-" + uuid.uuid4().hex[:8]
with open(nccl, "wb") as fh:
    fh.write(b"x" * 4096)
print("/dev/shm/" + rec.name, "/dev/shm/" + unrec.name, nccl, flush=True)
time.sleep(600)
"""


def _start_owner(state_dir, deployment, launch):
    env = child_env(VLLM_FLEET_STATE_DIR=state_dir, VLLM_FLEET_DEPLOYMENT=deployment,
                    VLLM_FLEET_LAUNCH_ID=launch)
    p = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, env=env)
    paths = p.stdout.readline().split()
    assert len(paths) == 3 and all(os.path.exists(x) for x in paths), paths
    return p, paths


def test_only_recorded_segments_of_dead_launches_of_this_deployment_are_removed(state_dir):
    """Deployment x, launch x-old killed -9: its recorded segment goes. Kept: its unrecorded
    segment and the NCCL-style file (not provably ours), deployment x-y's recorded segment of a
    killed launch (x is a prefix of x-y), and the recorded segment of x's live launch."""
    from vllm_fleet import ownership

    owners, paths = {}, {}
    try:
        for key, dep, launch in (("dead", "x", "x-1-aaaaaa"), ("live", "x", "x-2-bbbbbb"),
                                 ("other", "x-y", "x-y-3-cccccc")):
            owners[key], paths[key] = _start_owner(state_dir, dep, launch)
        for key in ("dead", "other"):
            owners[key].send_signal(signal.SIGKILL)
            owners[key].wait(10)
        assert all(os.path.exists(p) for ps in paths.values() for p in ps)  # leaked, like vLLM's
        found = ownership.removable_segments(str(state_dir), "x", own_launch="x-9-new")
        assert [seg for seg, _ in found] == [paths["dead"][0]]
        report = cleanup.run(env=dict(os.environ, VLLM_FLEET_STATE_DIR=str(state_dir),
                                      VLLM_FLEET_DEPLOYMENT="x", VLLM_FLEET_LAUNCH_ID="x-9-new"))
        assert report["shm"] == [paths["dead"][0]] and not os.path.exists(paths["dead"][0])
        assert not (state_dir / "launches" / "x-1-aaaaaa" / "shm" / os.path.basename(paths["dead"][0])).exists()
        for p in paths["dead"][1:] + paths["live"] + paths["other"]:
            assert os.path.exists(p), f"{p} is not provably a dead launch's of deployment x"
    finally:
        for p in owners.values():
            p.kill()
            p.wait(10)
        for p in [p for ps in paths.values() for p in ps]:
            if os.path.exists(p):
                os.unlink(p)


def test_a_killed_owner_not_yet_reaped_counts_as_dead(state_dir):
    """The cleanup SIGKILLs a dead launch's orphans, then judges that launch. Orphans are reaped by
    init, which on a busy host can be after that judgement: until then each is a zombie with its
    pid and start time unchanged. A zombie runs nothing and maps nothing, so its launch is dead
    and its recorded segment goes (seen under load: the segment stayed until the next launch)."""
    from vllm_fleet import ownership

    owner, paths = _start_owner(state_dir, "x", "x-1-aaaaaa")
    try:
        owner.send_signal(signal.SIGKILL)
        # not reaped on purpose (this test is its parent): a zombie, as an orphan not yet reaped
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _is_zombie(owner.pid):
            time.sleep(0.05)
        assert _is_zombie(owner.pid), "the killed owner should be a zombie until it is reaped"
        assert ownership.start_ticks(owner.pid) is not None  # same pid and start time as recorded
        assert ownership.Judge().launch_dead(str(state_dir / "launches" / "x-1-aaaaaa"))
        found = ownership.removable_segments(str(state_dir), "x", own_launch="x-9-new")
        assert [seg for seg, _ in found] == [paths[0]]
    finally:
        owner.kill()
        owner.wait(10)
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)


def _is_zombie(pid):
    with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
        data = fh.read()
    return data[data.rindex(")") + 2] == "Z"


def test_members_of_another_pid_namespace_are_never_judged_by_their_pid(state_dir):
    """A record from another pid namespace (a Ray worker's, seen from the API server's container)
    cannot be judged here: its launch counts as alive, its segments stay."""
    from vllm_fleet import ownership

    launch = state_dir / "launches" / "x-1-aaaaaa"
    (launch / "members").mkdir(parents=True)
    (launch / "members" / "999999").write_text(json.dumps({
        "pid": 999999, "start_ticks": 1, "pid_ns": "pid:[1]", "launch_id": "x-1-aaaaaa",
        "deployment": "x"}))
    judge = ownership.Judge()
    assert judge.process({"pid": 999999, "start_ticks": 1, "pid_ns": "pid:[1]"}) in ("unknown", "dead")
    if not judge.everything:  # in a container's pid namespace: never "dead"
        assert not judge.launch_dead(str(launch))
    # pid:[1] is no live namespace: only the host's view, which sees every process, may say dead
    assert judge.launch_dead(str(launch)) == judge.everything


def test_ipc_sockets_and_filestore_files(tmp_path):
    live_sock = socket.socket(socket.AF_UNIX)
    live_path = str(tmp_path / str(uuid.uuid4()))
    live_sock.bind(live_path)
    stale_path = str(tmp_path / str(uuid.uuid4()))
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale_path)
    s.close()  # the file stays: what a SIGKILLed zmq ipc:// endpoint leaves
    not_a_socket = tmp_path / str(uuid.uuid4())
    not_a_socket.write_text("x")
    store_open = tmp_path / "vllm_dist_aaaa1111"
    store_dead = tmp_path / "vllm_dist_bbbb2222"
    store_open.write_text("")
    store_dead.write_text("")
    store_young = tmp_path / "vllm_dist_cccc3333"  # a rendezvous in progress: not held open
    store_young.write_text("")
    old = time.time() - cleanup.STORE_AGE_S - 60
    for p in (store_open, store_dead):
        os.utime(p, (old, old))
    fh = open(store_open)
    try:
        found = cleanup.stale_ipc([str(tmp_path)], cleanup.bound_unix_sockets(),
                                  cleanup.files_in_use(), 0.0, time.time())
        assert stale_path in found and str(store_dead) in found
        assert live_path not in found and str(store_open) not in found
        assert str(not_a_socket) not in found and str(store_young) not in found
    finally:
        fh.close()
        live_sock.close()


# One rank of a real gloo rendezvous through a FileStore (vLLM's CPU workers initialise this way).
RANK = r"""
import datetime, os, sys, torch, torch.distributed as dist
path, rank = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=600))  # rank 1 starts late on purpose
t = torch.ones(1)
dist.all_reduce(t)
print(int(t.item()), flush=True)
os._exit(0)  # no gloo teardown race at interpreter exit (it can abort once the peer is gone)
"""


def test_filestore_of_a_rendezvous_in_progress_survives_another_launchs_cleanup(torch_py,
                                                                               tmp_path):
    """Launch X's ranks rendezvous through a FileStore while one rank is still loading; launch
    Y's startup cleanup runs meanwhile. The file is closed between FileStore operations, so
    'nobody has it open' holds for a live rendezvous: only its age may mark it stale."""
    path = tmp_path / f"vllm_dist_{uuid.uuid4().hex}"
    env = child_env()
    ranks = [subprocess.Popen([torch_py, "-c", RANK, str(path), "0"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    try:
        deadline = time.time() + 300
        while not path.exists() and time.time() < deadline:
            assert ranks[0].poll() is None, ranks[0].communicate()[1]
            time.sleep(0.1)
        assert path.exists(), "rank 0 never created its FileStore"
        time.sleep(1.5)  # older than the grace period used below
        # the in-use rule alone would remove it (the old behaviour): rank 0 rarely has it open
        listed, deadline = False, time.time() + 60
        while not listed and time.time() < deadline:
            listed = str(path) in cleanup.stale_ipc([str(tmp_path)], set(), cleanup.files_in_use(),
                                                    1.0, time.time(), store_age_s=0)
            time.sleep(0.05)
        assert listed, "a live rendezvous' FileStore looked in use every time"
        # the real pass (what launch Y's plugin runs, grace 1 s) keeps it
        removed = cleanup._remove(cleanup.stale_ipc([str(tmp_path)], cleanup.bound_unix_sockets(),
                                                    cleanup.files_in_use(), 1.0, time.time()),
                                  dry_run=False)
        assert str(path) not in removed and path.exists()
        ranks.append(subprocess.Popen([torch_py, "-c", RANK, str(path), "1"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for r in ranks:
            out, err = r.communicate(timeout=600)
            assert r.returncode == 0 and out.strip() == "2", err[-2000:]
    finally:
        for r in ranks:
            if r.poll() is None:
                r.kill()
                r.wait(10)


# A process that starts a grandchild with the given fleet markers and exits, so the grandchild
# is re-parented to init: the state a kill -9'd API server leaves its engine processes in.
ORPHANER = r"""
import os, subprocess, sys
env = dict(os.environ, **dict(kv.split("=", 1) for kv in sys.argv[1:]))
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(p.pid, flush=True)
"""


def _orphan(**markers):
    out = subprocess.run([sys.executable, "-c", ORPHANER] + [f"{k}={v}" for k, v in markers.items()],
                         capture_output=True, text=True, check=True).stdout
    pid = int(out.split()[0])
    deadline = time.time() + 30
    while cleanup._ppid(pid) not in (0, 1) and time.time() < deadline:
        time.sleep(0.05)
    if cleanup._ppid(pid) not in (0, 1):
        os.kill(pid, signal.SIGKILL)
        pytest.skip("orphans are re-parented to a subreaper here, not to init")
    return pid


def test_orphans_only_of_dead_earlier_launch_of_same_deployment_are_killed():
    dep = f"deptest-{uuid.uuid4().hex[:8]}"
    other = f"otherdep-{uuid.uuid4().hex[:8]}"
    env_live = dict(os.environ, VLLM_FLEET_DEPLOYMENT=dep, VLLM_FLEET_LAUNCH_ID=f"{dep}-live")
    pids = {}
    live_attached = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                     env=env_live)
    try:
        pids["dead_launch"] = _orphan(VLLM_FLEET_DEPLOYMENT=dep, VLLM_FLEET_LAUNCH_ID=f"{dep}-old")
        pids["dead_launch_2"] = _orphan(VLLM_FLEET_DEPLOYMENT=dep,
                                        VLLM_FLEET_LAUNCH_ID=f"{dep}-old")
        pids["other_deployment"] = _orphan(VLLM_FLEET_DEPLOYMENT=other,
                                           VLLM_FLEET_LAUNCH_ID=f"{other}-old")
        pids["own_launch"] = _orphan(VLLM_FLEET_DEPLOYMENT=dep, VLLM_FLEET_LAUNCH_ID=f"{dep}-new")
        pids["unmarked"] = _orphan()
        pids["live_other_launch"] = live_attached.pid

        groups = cleanup.dead_launch_orphans(list(cleanup.iter_processes()), dep, f"{dep}-new")
        assert set(groups) == {f"{dep}-old"}
        assert {p.pid for p in groups[f"{dep}-old"]} == {pids["dead_launch"],
                                                          pids["dead_launch_2"]}
        killed = cleanup.kill_processes(groups[f"{dep}-old"], grace_s=2)
        assert sorted(killed) == sorted([pids["dead_launch"], pids["dead_launch_2"]])
        assert not cleanup._alive(pids["dead_launch"]) and not cleanup._alive(pids["dead_launch_2"])
        for name in ("other_deployment", "own_launch", "unmarked", "live_other_launch"):
            assert cleanup._alive(pids[name]), f"{name} must not be touched"
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        live_attached.wait(10)


def test_pid_reuse_guard_skips_process_whose_marker_changed():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        fake = cleanup.Proc(p.pid, 1, "dep", "dep-old", "")  # /proc says: no markers
        assert cleanup.kill_processes([fake], grace_s=0.5) == []
        assert p.poll() is None
    finally:
        p.kill()
        p.wait(10)


def test_member_registry_identifies_processes_whose_environ_was_overwritten(state_dir):
    """vLLM's setproctitle clobbers /proc/<pid>/environ of EngineCore/workers; the plugin's
    member files (pid + start time) still tie them to their launch, and a reused pid does not."""
    import json

    from vllm_fleet import state

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # no markers
    try:
        d = state_dir / "launches" / "dep-old" / "members"
        d.mkdir(parents=True)
        (d / str(p.pid)).write_text(json.dumps({
            "pid": p.pid, "start_ticks": state.proc_start_ticks(p.pid), "launch_id": "dep-old",
            "deployment": "dep"}))
        (d / "1").write_text(json.dumps({"pid": 1, "start_ticks": -5, "launch_id": "dep-old",
                                         "deployment": "dep"}))  # pid reused by another process
        procs = {q.pid: q for q in cleanup.iter_processes()}
        assert (procs[p.pid].launch_id, procs[p.pid].deployment) == ("dep-old", "dep")
        assert procs[1].launch_id is None
    finally:
        p.kill()
        p.wait(10)
