# -*- coding: utf-8 -*-
"""Wait for one of the model role's async jobs, showing its progress in the Ansible output.

Ansible's own async polling prints nothing but "still running"; a model transfer can take an
hour, so this polls async_status and the job's progress file (written by fleet_model.py or
rsync) every `interval` seconds and prints the latest line when it changed. The wait is bounded
by `deadline` seconds (derived from the model size by the role); the task's own `timeout` must
be above it, so the global task_timeout never cuts a transfer.

Returns the job's JSON output as `data`; fails naming the host when the job failed (its
{"error": ...}), or when the deadline passed.
"""
from __future__ import annotations

import json
import shlex
import signal
import time

from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("jid", "progress", "deadline", "label", "interval"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        args = self._task.args
        jid, label = args.get("jid"), args.get("label", "model job")
        deadline_s = float(args.get("deadline", 3600))
        interval = float(args.get("interval", 10))
        host = task_vars.get("inventory_hostname", "?")
        if not jid:
            return dict(result, failed=True, msg=f"node {host}: {label}: no job id")
        started = time.monotonic()
        shown = ""
        async_dir = self._remote_expand_user(self.get_shell_option("async_dir", default="~/.ansible_async"))
        pause = 0.25  # a job that is quick (a re-run with nothing to do) is seen within a second
        while True:
            status = self._execute_module(module_name="ansible.legacy.async_status", task_vars=task_vars,
                                          module_args={"jid": jid, "mode": "status", "_async_dir": async_dir})
            if status.get("failed") and not status.get("finished"):
                # the job file appears once async_wrapper's child has written it: on a host that is
                # very busy (or whose disk is full) that can take a while
                if "could not find job" in str(status.get("msg", "")) and time.monotonic() - started < 120:
                    time.sleep(2)
                    continue
                return dict(result, failed=True, msg=f"node {host}: {label}: {status.get('msg', status)}")
            if status.get("finished"):
                self._execute_module(module_name="ansible.legacy.async_status", task_vars=task_vars,
                                     module_args={"jid": jid, "mode": "cleanup", "_async_dir": async_dir})
                return self._finish(result, status, host, label, time.monotonic() - started)
            if args.get("progress"):
                line = self._progress(args["progress"])
                if line and line != shown:
                    display.display(f"  [{host}] {line}")
                    shown = line
            if time.monotonic() - started > deadline_s:
                return dict(result, failed=True,
                            msg=f"node {host}: {label} did not finish within {deadline_s:.0f} s (a deadline from the "
                                f"model size and model_min_transfer_rate); last progress: {shown or 'none'}. "
                                f"What arrived is kept in .fleet-partial: a re-run resumes.")
            time.sleep(pause)
            pause = min(pause * 2, interval)

    def _progress(self, path: str) -> str:
        res = self._low_level_execute_command(f"tail -n 1 {shlex.quote(path)} 2>/dev/null", sudoable=True)
        return (res.get("stdout") or "").strip()

    @staticmethod
    def _finish(result, status, host, label, elapsed):
        out = (status.get("stdout") or "").strip()
        try:
            data = json.loads(out.splitlines()[-1]) if out else {}
        except ValueError:
            data = {}
        if status.get("rc", 1) != 0 or "error" in data:
            rc = status.get("rc")
            if isinstance(rc, int) and rc < 0 and not data.get("error"):
                # stopped from outside (a reboot, an OOM kill, someone's kill): the transfer's
                # children went with it, and what arrived waits in .fleet-partial
                name = signal.Signals(-rc).name if -rc in signal.valid_signals() else f"signal {-rc}"
                why = f"stopped by {name}; what arrived is kept in .fleet-partial: a re-run resumes from it"
            else:
                why = data.get("error") or (status.get("stderr") or out or status.get("msg") or "no output")[-2000:]
            return dict(result, failed=True, data=data, msg=f"node {host}: {label}: {why}")
        moved = [f"{data[k]:,} bytes {k.split('_')[1]}" for k in ("bytes_received", "bytes_sent", "bytes_copied")
                 if isinstance(data.get(k), int)]
        if isinstance(data.get("fetched"), list) and data["fetched"]:
            kept = data.get("bytes_kept") or 0
            moved.append(f"{len(data['fetched'])} file(s), {data.get('bytes', 0) - kept:,} bytes downloaded"
                         + (f", {kept:,} resumed from an interrupted run" if kept else ""))
        msg = f"node {host}: {label}: done in {elapsed:.0f} s" + (f" ({', '.join(moved)})" if moved else "")
        if moved:
            display.display(f"  [{host}] {label}: done in {elapsed:.0f} s ({', '.join(moved)})")
        return dict(result, changed=False, data=data, elapsed=round(elapsed, 1), msg=msg)
