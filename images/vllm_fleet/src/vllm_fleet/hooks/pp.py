"""PP group hook (CUDA workers): wraps the PP group's ``isend_tensor_dict`` / ``irecv_tensor_dict``
and its device communicator's ``send`` for passive timing of the real pipeline transfers
(pp_timing.py)."""

from __future__ import annotations

import functools
import os

from .core import ACTIVE, _guard, log_once, logger


def _gather_hosts(coordinator) -> list:
    """Host names of every rank of the group, over its gloo cpu_group (a collective: only where
    all its ranks are together, i.e. inside GroupCoordinator.__init__)."""
    import torch.distributed as dist

    from .. import state

    hosts = [None] * coordinator.world_size
    dist.all_gather_object(hosts, state.host_name(), group=coordinator.cpu_group)
    return hosts


@_guard("pp timing")
def _wrap_pp(coordinator) -> None:
    """PP group of a CUDA worker: passive timing of the real pipeline transfers (pp_timing.py):
    ``isend_tensor_dict``/``irecv_tensor_dict`` (RayExecutorV2, mp executor) and the device
    communicator's ``send`` (Ray's compiled-graph executor)."""
    from .. import probe

    # Every condition here is the same on all ranks of the group (group, size, class, device,
    # env), never rank-local success: the gather below must be entered by all of them or none.
    if (os.environ.get("VLLM_FLEET_PP_TIMING", "1") == "0"
            or probe.group_label(coordinator) != "pp" or coordinator.world_size < 2):
        return
    device = getattr(getattr(coordinator, "device", None), "type", "?")
    if device != "cuda":
        log_once("pp-timing-cpu", "vllm-fleet: inactive: PP timing (CUDA only; this PP group "
                 "is on %s, whose send/recv vLLM runs synchronously)", device)
        return
    comm = getattr(coordinator, "device_communicator", None)
    wrap_send = (comm is not None and hasattr(comm, "send")
                 and not getattr(comm, "_fleet_send", False))
    wrap_dict = (hasattr(coordinator, "isend_tensor_dict")
                 and hasattr(coordinator, "irecv_tensor_dict")
                 and not getattr(coordinator, "_fleet_pp", False))
    if not (wrap_send or wrap_dict):
        return
    # Scope, without any collective later: every rank of the PP group is inside this __init__
    # together (vLLM builds groups collectively), so one gather of host names is safe here.
    hosts = _gather_hosts(coordinator)
    scope = "intra" if len(set(hosts)) == 1 else "inter"
    rec = probe.get()
    hooked = []
    if wrap_dict:
        coordinator._fleet_scope = scope
        orig_isend, orig_irecv = coordinator.isend_tensor_dict, coordinator.irecv_tensor_dict

        @functools.wraps(orig_isend)
        def isend_tensor_dict(tensor_dict, *args, **kwargs):
            return rec.pp_isend(coordinator, orig_isend, tensor_dict, *args, **kwargs)

        @functools.wraps(orig_irecv)
        def irecv_tensor_dict(*args, **kwargs):
            return rec.pp_irecv(coordinator, orig_irecv, *args, **kwargs)

        coordinator.isend_tensor_dict = isend_tensor_dict
        coordinator.irecv_tensor_dict = irecv_tensor_dict
        coordinator._fleet_pp = True
        ACTIVE["pp_dict"] = "PP isend_tensor_dict/irecv_tensor_dict"
        hooked.append("isend/irecv_tensor_dict")
    if wrap_send:
        comm._fleet_scope = scope
        orig = comm.send

        @functools.wraps(orig)
        def send(tensor, *args, **kwargs):
            return rec.p2p_send(comm, orig, tensor, *args, **kwargs)

        comm.send = send
        comm._fleet_send = True
        ACTIVE["pp_send"] = "PP device_communicator.send"
        hooked.append("device_communicator.send")
    logger.info("vllm-fleet: PP timing active on %s (rank %s of a PP group of %d, %s-node: %s)",
                " + ".join(hooked), coordinator.rank_in_group, coordinator.world_size, scope,
                ", ".join(hosts))
