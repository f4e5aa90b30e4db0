"""vllm-fleet exporter: what vLLM's own /metrics does not tell (see docs/monitoring.md)."""

__version__ = "0.1.0"
