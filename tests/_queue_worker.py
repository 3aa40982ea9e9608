"""A minimal queue consumer for the store's queue tests: claims jobs until none is left, logging each claim."""

import sys
import time

from app.store import Store

url, worker_id, log_path = sys.argv[1:4]
work_s, lease_s = float(sys.argv[4]), float(sys.argv[5])
store = Store(url)
idle = 0
while idle < 3:
    job = store.claim_job(worker_id, lease_seconds=lease_s)
    if job is None:
        idle += 1
        time.sleep(0.2)
        continue
    idle = 0
    with open(log_path, "a") as f:
        f.write(f"{worker_id} {job.id}\n")
    time.sleep(work_s)
    if store.heartbeat(job.id, worker_id, lease_s):
        store.finish_job(job.id, "done")
