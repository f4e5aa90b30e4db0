"""NCCL transport from NCCL's own INFO lines (wording of NCCL 2.18-2.21)."""

from vllm_fleet_exporter.nccl import NcclLogParser, parse_line

IB_RUN = """\
node1:2410:2410 [0] NCCL INFO Bootstrap : Using eth0:172.28.10.11<0>
node1:2410:2410 [0] NCCL INFO NET/Plugin: No plugin found (libnccl-net.so)
node1:2410:2410 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB ; OOB eth0:172.28.10.11<0>
node1:2410:2410 [0] NCCL INFO Using network IB
node1:2410:2410 [0] NCCL INFO comm 0x55d0 rank 0 nranks 4 cudaDev 0 nvmlDev 0 busId 18000 commId 0x1 - Init START
node1:2410:2501 [0] NCCL INFO Channel 00/0 :    0   1   2   3
node1:2410:2501 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/IPC
node1:2410:2501 [0] NCCL INFO Channel 01/0 : 0[0] -> 1[1] via P2P/CUMEM/read
node1:2410:2501 [0] NCCL INFO Channel 00/0 : 3[1] -> 0[0] [receive] via NET/IB/0/GDRDMA
node1:2410:2501 [0] NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via NET/IB/1/GDRDMA
node1:2410:2501 [0] NCCL INFO NVLS multicast support is not available on dev 0
node1:2410:2501 [0] NCCL INFO Connected all rings
"""

SOCKET_RUN = """\
node3:77:77 [0] NCCL INFO NET/IB : No device found.
node3:77:77 [0] NCCL INFO NET/Socket : Using [0]fab0:172.28.20.13<0>
node3:77:77 [0] NCCL INFO Using network Socket
node3:77:90 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/Socket/0
node3:77:90 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Socket/0
node3:77:90 [0] NCCL INFO Channel 00 : 0[0] -> 1[1] via SHM/direct/direct
"""


def test_parse_line_classifies_transports():
    assert parse_line("h:1:1 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/IPC") == \
        ("p2p_ipc", True)
    assert parse_line("h:1:1 [0] NCCL INFO Channel 02/1 : 0[0] -> 1[1] via P2P/direct pointer") \
        == ("p2p_direct", True)
    assert parse_line("h:1:1 [0] NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via "
                      "NET/IBext_v8/0/GDRDMA") == ("net_ib", True)
    assert parse_line("h:1:1 [0] NCCL INFO Using network Socket") == ("net_socket", False)
    assert parse_line("h:1:1 [0] NCCL INFO NVLS comm 0x1 headRank 0 nHeads 4 buffSize 1048576")\
        == ("nvls", False)
    # negative wording and non-INFO lines are not evidence
    assert parse_line("h:1:1 [0] NCCL INFO NVLS multicast support is not available on dev 0") \
        == (None, False)
    assert parse_line("h:1:1 [0] NCCL WARN Channel 00 via NET/Socket/0") == (None, False)
    assert parse_line("random text via NET/IB/0") == (None, False)


def test_ib_run(tmp_path):
    ld = tmp_path / "L1"
    ld.mkdir()
    (ld / "nccl-node1-2410.log").write_text(IB_RUN)
    r = NcclLogParser().update(["{launch_dir}/nccl-*.log"], str(ld))
    assert r["files"] == 1
    assert r["in_use"]["net_ib"] == 1 and r["in_use"]["net_socket"] == 0
    assert r["in_use"]["nvls"] == 0
    assert r["connections"] == {**{k: 0 for k in r["connections"]},
                                "net_ib": 2, "p2p_ipc": 1, "p2p_cumem": 1}


def test_socket_fallback_and_incremental_reads(tmp_path):
    ld = tmp_path / "L1"
    ld.mkdir()
    log = ld / "nccl-node3-77.log"
    p = NcclLogParser()
    head, tail = SOCKET_RUN[:150], SOCKET_RUN[150:]  # cut mid-line: the rest arrives later
    log.write_text(head)
    r = p.update(["{launch_dir}/nccl-*.log"], str(ld))
    assert r["in_use"]["net_socket"] == 0
    with open(log, "a") as fh:
        fh.write(tail)
    r = p.update(["{launch_dir}/nccl-*.log"], str(ld))
    assert r["in_use"]["net_socket"] == 1 and r["in_use"]["net_ib"] == 0
    assert r["connections"]["net_socket"] == 2 and r["connections"]["shm"] == 1
    # reading again adds nothing (offsets are kept)
    assert p.update(["{launch_dir}/nccl-*.log"], str(ld))["connections"]["net_socket"] == 2
    # a new launch forgets the old launch's evidence
    ld2 = tmp_path / "L2"
    ld2.mkdir()
    (ld2 / "nccl-node3-99.log").write_text(IB_RUN)
    r = p.update(["{launch_dir}/nccl-*.log"], str(ld2))
    assert r["in_use"]["net_socket"] == 0 and r["in_use"]["net_ib"] == 1


def test_truncated_file_is_reread(tmp_path):
    log = tmp_path / "n.log"
    log.write_text(SOCKET_RUN)
    p = NcclLogParser()
    assert p.update([str(log)], None)["connections"]["net_socket"] == 2
    log.write_text(IB_RUN.splitlines(True)[6])  # shorter: a rotated/recreated file
    r = p.update([str(log)], None)
    assert r["connections"]["net_socket"] == 0 and r["connections"]["p2p_ipc"] == 1
