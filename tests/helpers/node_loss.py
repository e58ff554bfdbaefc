"""Run by tests/test_faults.py in its own process: a multi-node Ray cluster on this
machine, a training run, and the loss of the node that hosts the training worker.

    python tests/helpers/node_loss.py DATA CACHE STORAGE

Prints one JSON line: the epochs of the final history and whether a node was removed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"

import ray  # noqa: E402
from ray._private.state import available_resources_per_node  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME  # noqa: E402

from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.run import train  # noqa: E402


def main() -> None:
    data, cache, storage = sys.argv[1:4]
    # The head has no CPUs, so the training worker lands on a node we can remove.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg = TrainConfig(
        mode="catkd",
        data=data,
        cache=cache,
        student="resnet8",
        epochs=4,
        batch_size=8,
        lr_decay_epochs=[3],
        num_workers=1,
        loader_workers=0,
        storage_path=storage,
        name="node-loss",
        max_failures=3,
    )
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(train(cfg)))
    runner.start()
    # Written once the controller has registered a checkpoint (epoch 1's). metrics.jsonl
    # is written before report() uploads it: a node lost then repeats epoch 1 (correct,
    # but not the restart from a checkpoint this test is about).
    registered = os.path.join(storage, "node-loss", CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    removed = False
    deadline = time.time() + 240
    while runner.is_alive() and time.time() < deadline and not removed:
        if os.path.exists(registered):
            time.sleep(0.3)  # into the second epoch
            # The node whose only CPU is taken hosts the training worker. (Read from the GCS:
            # the state API needs this cluster's dashboard, whose ports the test session's
            # own Ray may already hold.)
            free = available_resources_per_node()
            victim = next((n for n in workers if free.get(n.node_id, {}).get("CPU", 0) == 0), None)
            if victim is not None:
                cluster.remove_node(victim)
                removed = True
        time.sleep(0.05)
    runner.join(timeout=300)
    epochs = [h["epoch"] for h in outcome.get("history", [])]
    print(json.dumps({"epochs": epochs, "removed": removed}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
