"""Run by tests/test_jobs.py in a fresh process (so Ray reads this process's auth
settings): submit one job through the Ray Jobs API and wait for it.

    python tests/helpers/submit_job.py DASHBOARD_URL WORKING_DIR ENTRYPOINT

Prints one JSON line: {"status": ..., "logs": ...}.
"""

from __future__ import annotations

import json
import sys
import time

import yaml
from ray.job_submission import JobStatus, JobSubmissionClient


def main() -> None:
    address, working_dir, entrypoint = sys.argv[1:4]
    deadline = time.time() + float(sys.argv[4]) if len(sys.argv) > 4 else time.time() + 300
    while True:  # the dashboard, then the node's job agent, come up after `ray start`
        try:
            client = JobSubmissionClient(address)
            with open(f"{working_dir}/jobs/runtime_env.yaml") as f:
                runtime_env = yaml.safe_load(f) | {"working_dir": working_dir}
            job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except Exception as exc:
            print(f"submit: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
            if time.time() > deadline:
                raise SystemExit(f"could not submit: {exc}") from exc
            time.sleep(2)
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            break
        time.sleep(1)
    print(json.dumps({"status": str(status), "logs": client.get_job_logs(job)}))


if __name__ == "__main__":
    main()
