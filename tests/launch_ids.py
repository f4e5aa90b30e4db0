"""Launch ids for the port tests (tests/plugin/test_launch.py, tests/lab/test_serve_args.py)."""
from vllm_fleet import launch


def colliding_launch_ids(prefix: str = "dep") -> tuple[str, str]:
    """Two ids whose hash lands on the same port block (forces the walk-upward path)."""
    seen = {}
    for i in range(5000):
        lid = f"{prefix}-{i}"
        b = launch.base_port(lid)
        if b in seen:
            return seen[b], lid
        seen[b] = lid
    raise AssertionError(f"no colliding launch ids with prefix {prefix!r}")
