"""Sum an ansible-playbook log's per-task times (ansible.posix.profile_tasks lines) by role.

    python3 by_role.py deploy-rerun.log
Each task's time is the "(h:mm:ss.fff)" figure on the line after the next task's header.
"""
import collections
import re
import sys

prev = cur = None
rows = []
for line in open(sys.argv[1]):
    m = re.match(r'^(TASK|PLAY|RUNNING HANDLER) \[(.*?)\] \*+', line)
    if m:
        cur = (m.group(1), m.group(2))
        continue
    m = re.search(r'\((\d+):(\d+):([\d.]+)\)\s+(\d+):(\d+):([\d.]+)', line)
    if m:
        if prev:
            rows.append((prev, int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))))
        prev = cur
total, count = collections.Counter(), collections.Counter()
for (kind, name), seconds in rows:
    role = name.split(' : ')[0] if ' : ' in name else f'({kind})'
    total[role] += seconds
    count[role] += 1
for role, seconds in total.most_common():
    print(f"{role:20s} {count[role]:4d} tasks {seconds:7.1f}s")
print('total', round(sum(total.values()), 1))
