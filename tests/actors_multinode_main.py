"""Run by tests/test_actors_multinode.py in its own process: a local multi-node Ray cluster
(several raylets on this machine, `ray.cluster_utils.Cluster`), one rank per node with SPREAD,
exact distributed attention. Prints one JSON line (the test asserts on it)."""
from __future__ import annotations

import json
import sys

import ray
import torch
from ray.cluster_utils import Cluster

from ringserve.actors import ActorGroup
from ringserve.kernels.reference import attention_ref
from ringserve.parallel import distributed_attention


def main(n: int, total: int, seed: int) -> dict:
    # the head node gets no CPU, so every 1-CPU rank must go to a worker node
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(n):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    result = {}
    try:
        g = ActorGroup(n, device="cpu", placement_strategy="SPREAD", num_cpus_per_worker=1,
                       transport_timeout_s=90, placement_timeout_s=90)
        try:
            result["node_ids"] = [h["node_id"] for h in g.health()]
            result["cluster_nodes"] = len([x for x in ray.nodes() if x["Alive"]])
            # ranks on other nodes dial rank 0's store: it listens on that node's address
            result["store_host"] = g.store_address[0]
            result["rank0_node_ip"] = next(x["NodeManagerAddress"] for x in ray.nodes()
                                           if x["NodeID"] == result["node_ids"][0])
            gen = torch.Generator().manual_seed(seed)
            q = torch.randn(1, total, 4, 16, generator=gen)
            k = torch.randn(1, total, 2, 16, generator=gen)
            v = torch.randn(1, total, 2, 16, generator=gen)
            for schedule in ("striped", "ring"):
                out, lse = distributed_attention(q, k, v, group=g, layout=schedule, causal=True)
                ref_out, ref_lse = attention_ref(q, k, v, None, True, None)
                result[schedule] = {
                    "out_rel_err": ((out.double() - ref_out).norm() / ref_out.norm()).item(),
                    "lse_max_abs_err": (lse.double() - ref_lse.double()).abs().max().item()}
        finally:
            g.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":
    n, total, seed = (int(a) for a in sys.argv[1:4])
    print("RESULT " + json.dumps(main(n, total, seed)), flush=True)
