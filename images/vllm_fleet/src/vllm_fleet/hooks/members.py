"""Member registry hooks: the processes of a launch register themselves (``members/<pid>``); the
engine core process as ``engine`` (the exporter's verdict judges the members)."""

from __future__ import annotations

from .core import ACTIVE, _guard, _wrap_init_once


@_guard("member registry")
def _register_member(role: str | None = None) -> None:
    from .. import state

    state.register_member(role=role)


@_guard("engine member")
def _patch_engine_core(core) -> None:
    """The engine core process is a long-lived member of the launch (the verdict judges it)."""
    cls = getattr(core, "EngineCore", None)
    if cls is not None and _wrap_init_once(cls, lambda _self: _register_member("engine")):
        ACTIVE["engine_member"] = "EngineCore.__init__"
