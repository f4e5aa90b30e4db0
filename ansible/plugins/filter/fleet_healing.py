"""The healer's decision, as a filter so the rule lives in Python and is unit-tested.

    {{ verdict | fleet_heal_decision(records, replica, now, max_per_hour, partial_scopes) }}
      -> {'action': 'heal' | 'skip' | 'refuse', 'why': '...', 'scope': 'engine' | 'ray' | 'replica',
          'fabric_check': bool}

verdict: the head exporter's /verdict JSON (or None when it did not answer); records: the
healer's log (dicts with ts, replica, result), newest last.
- skip    the replica is not unhealthy now (healthy, starting, maintenance: someone else is on it)
- refuse  this replica was already healed max_per_hour times in the last hour (a relaunch does
          not fix it: a human must look) -- paged by VllmFleetHealRefused
- heal    otherwise. A head that does not answer at all is a dead replica: heal it.
A replica that is not unhealthy is never relaunched, so healing never takes out a replica that
serves, let alone the last one.

scope (of a heal): 'replica' relaunches the vLLM containers and the Ray nodes; 'engine' only the
vLLM containers, 'ray' only the Ray nodes. A part alone only where the caller allows it
(partial_scopes; the caller allows them where vLLM does not run inside Ray, i.e. the cpu engine's
--nnodes launch, so one part's failure leaves the other sound) and every problem is that part's
own: ENGINE_REASONS for 'engine', a Ray node short (ray_nodes_missing, or a missing raylet) for
'ray'; a member host's problem counts by its `cause`. Anything else (a link down, a silent host or
head, a launch that never served, problems of both parts) gets the whole replica.

fabric_check (of a heal): false only for an engine-only heal none of whose problems a fabric fault
could cause (FABRIC_SUSPECT: a stuck collective or transfer); the healer then may skip the
relaunch's fabric check (healer_engine_fabric_check).
"""

from __future__ import annotations

import re

from ansible.errors import AnsibleFilterError


# ansible-runner (under ansible-rulebook) marks every line a playbook prints with its event id:
# ESC[K <base64 of {"uuid": ...}> ESC[<n>D ESC[K; a nested ansible-playbook inherits that. Plus
# ordinary terminal escapes (colour).
_RUNNER_EVENT = re.compile(r"\x1b\[K[A-Za-z0-9+/=]*\x1b\[\d+D\x1b\[K")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def fleet_heal_log_text(text):
    """A relaunch's output as plain text for the heal log and its summary: the event markers and
    terminal escapes removed, the lines kept. A list (stdout, stderr) is joined line after line."""
    if isinstance(text, (list, tuple)):
        text = "\n".join(str(part or "") for part in text)
    return _ANSI.sub("", _RUNNER_EVENT.sub("", str(text or "")))


# The engine's own failures: a registered vLLM process stopped, frozen, exited or wedged, its API
# silent, its canaries failing. None of them says anything about the Ray nodes.
ENGINE_REASONS = frozenset({"member_exited", "member_stopped", "member_frozen", "heartbeat_stale",
                            "collective_stuck", "api_down", "canary_failing"})


# Engine reasons a fabric fault can also cause (a transfer stuck on a link that still says up):
# a relaunch after one keeps the fabric check, which finds a broken link in seconds.
FABRIC_SUSPECT = frozenset({"collective_stuck"})


def _causes(verdict):
    causes = []
    for p in (verdict.get("problems") or []) if isinstance(verdict, dict) else []:
        if isinstance(p, dict):  # a member host's problem counts by its own reason (its cause)
            reason = p.get("cause") if p.get("reason") == "member_host_unhealthy" else p.get("reason")
            causes.append((reason, p.get("process")))
    return causes


def _is_ray_problem(cause, process):
    return cause == "ray_nodes_missing" or (cause == "process_missing" and process == "raylet")


def heal_scope(causes, partial_scopes=()):
    """'engine' or 'ray' when allowed (partial_scopes) and every problem (_causes) is that part's
    own; else 'replica'."""
    if not causes:
        return "replica"
    if "engine" in partial_scopes and all(c in ENGINE_REASONS for c, _ in causes):
        return "engine"
    if "ray" in partial_scopes and all(_is_ray_problem(c, proc) for c, proc in causes):
        return "ray"
    return "replica"


def fleet_heal_decision(verdict, records, replica, now, max_per_hour, partial_scopes=()):
    try:
        now = float(now)
        max_per_hour = int(max_per_hour)
        if isinstance(partial_scopes, (str, bytes)):
            raise TypeError(f"partial_scopes must be a list, got {partial_scopes!r}")
        partial_scopes = [str(x) for x in partial_scopes or ()]
    except (TypeError, ValueError) as exc:
        raise AnsibleFilterError(f"fleet_heal_decision: {exc}") from exc
    if isinstance(verdict, dict):
        state = str(verdict.get("state", "unknown"))
        if state != "unhealthy":
            return {"action": "skip", "why": f"replica {replica} is {state} now"}
        why = "; ".join(str(p.get("detail", "")) for p in verdict.get("problems") or []
                        if isinstance(p, dict)) or "unhealthy"
    else:
        why = "its head's exporter does not answer"
    recent = [r for r in records or [] if isinstance(r, dict) and r.get("replica") == replica
              and r.get("result") == "started" and now - float(r.get("ts", 0)) < 3600]
    if len(recent) >= max_per_hour:
        return {"action": "refuse",
                "why": f"replica {replica} was already healed {len(recent)} times in the last "
                       f"hour (heal_max_per_hour={max_per_hour}); it is still unhealthy: {why}"}
    causes = _causes(verdict)
    scope = heal_scope(causes, partial_scopes)
    # fabric_check: whether the relaunch should run the fabric check (the healer may skip it for an
    # engine-only heal whose problems no fabric fault explains).
    fabric_check = scope != "engine" or any(c in FABRIC_SUSPECT for c, _ in causes)
    return {"action": "heal", "why": why, "scope": scope, "fabric_check": fabric_check}


class FilterModule:
    def filters(self):
        return {"fleet_heal_decision": fleet_heal_decision, "fleet_heal_log_text": fleet_heal_log_text}
