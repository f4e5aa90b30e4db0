"""vllm-fleet's in-image package: the vLLM plugin (``plugin``, its hooks in ``hooks``), its parts
(``p2p_gate``, ``cleanup``, ``launch``, ``probe``, ``pp_timing``, ``watchdog``, ``state``), the
fabric check (``fabric_check``) and the container entrypoints. Stdlib-only at import time
(docs/design.md)."""

__version__ = "0.1.0"
