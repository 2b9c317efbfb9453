"""Run by tests/test_tp.py in its own process: a local Ray cluster of three fake nodes
(`ray.cluster_utils.Cluster`, several raylets on this machine) and an ActorGroup of 3 shards x
2 TP ranks placed SPREAD. Prints one JSON line with where each actor landed and what its ring
and TP communicators see (the test asserts on it)."""
from __future__ import annotations

import json

import ray
from ray.cluster_utils import Cluster

from ringserve.actors import ActorGroup


def main() -> dict:
    # the head gets no CPU, so every actor goes to a worker node; each node could hold two
    # TP groups (4 CPUs), so spreading them is the strategy's doing, not a lack of room
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        g = ActorGroup(3, device="cpu", placement_strategy="SPREAD", num_cpus_per_worker=1,
                       transport_timeout_s=90, placement_timeout_s=90, tp_size=2)
        try:
            health = g.health()
            return {"nodes": [h["node_id"] for h in health],
                    "ranks": [[h["rank"], h["tp_rank"]] for h in health],
                    "pids": [h["pid"] for h in health],
                    "ring": g.call_actors("check_collectives", 60),
                    "tp": g.call_actors("check_tp_group", 60),
                    "cluster_nodes": len([x for x in ray.nodes() if x["Alive"]])}
        finally:
            g.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()), flush=True)
