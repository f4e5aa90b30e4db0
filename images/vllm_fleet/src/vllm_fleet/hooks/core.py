"""What every hook family shares: the plugin's logger and log-once, the guard that keeps a failing
hook from breaking vLLM, post-import patching, the wrap-``__init__``-once helper, and the record
of active hooks (``ACTIVE``)."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
import traceback

logger = logging.getLogger("vllm_fleet")

_lock = threading.RLock()  # register() and the worker set-up (groups._after_group_init)
_logged_once: set[str] = set()
_post_import: dict[str, list] = {}
ACTIVE: dict[str, str] = {}     # hook name -> where (for the one "hooks active" line and tests)


def _setup_logging() -> None:
    # vLLM configures only the "vllm" logger; ours would print WARNING+ only via lastResort.
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [vllm-fleet pid=%(process)d] "
                                           "%(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("VLLM_FLEET_LOG_LEVEL", "INFO").upper())
    logger.propagate = False


def log_once(key: str, msg: str, *args, level=logging.INFO) -> None:
    if key in _logged_once:
        return
    _logged_once.add(key)
    logger.log(level, msg, *args)


def _guard(name: str):
    """Decorator for hook bodies: any exception is logged once and swallowed."""
    def deco(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            try:
                return fn(*a, **kw)
            except Exception:
                log_once(f"fail:{name}", "vllm-fleet: hook %s failed; serving continues without it: %s",
                         name, traceback.format_exc(limit=4), level=logging.WARNING)
                return None
        return inner
    return deco


# ------------------------------------------------------------------ post-import hooks

class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs our patch functions right after a watched module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _post_import:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                loader = spec.loader
                if hasattr(loader, "exec_module") and not getattr(loader, "_fleet", False):
                    orig = loader.exec_module

                    def exec_module(module, _orig=orig, _name=fullname):
                        _orig(module)
                        _run_post_import(_name, module)

                    loader.exec_module = exec_module
                    loader._fleet = True
                return spec
        return None


def _run_post_import(name: str, module) -> None:
    for fn in _post_import.get(name, []):
        _guard(f"patch {name}")(fn)(module)


def when_imported(name: str, fn) -> None:
    _post_import.setdefault(name, []).append(fn)
    mod = sys.modules.get(name)
    if mod is not None:
        _guard(f"patch {name}")(fn)(mod)


def _wrap_init_once(cls, after, before=None) -> bool:
    """Wrap ``cls.__init__`` so that ``before()`` runs first and ``after(self)`` once the object
    exists. A class is wrapped once per process (marked); False when it already was."""
    if getattr(cls, "_fleet_patched", False):
        return False
    cls._fleet_patched = True
    orig_init = cls.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        if before is not None:
            before()
        orig_init(self, *args, **kwargs)
        after(self)

    cls.__init__ = __init__
    return True
