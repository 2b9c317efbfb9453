"""Scaling with the world size, on what a CPU-only machine can show (issue 8's CPU part).

Three tables, world sizes 1, 2, 4, 8:
  1. work balance (exact counts, no timing): for causal attention at 256K-1M tokens, the number
     of BLOCK x BLOCK kernel tiles each rank computes under each schedule (tiles the mask removes
     are skipped by the kernel; a partly visible tile costs a full one). T1_tiles / (N * max_rank
     tiles) is the parallel efficiency the schedule allows when the ring hides its transfers:
     an upper bound set by load balance, not a measurement of GPUs.
  2. measured on this machine: exact causal ring attention over N Ray CPU actors (gloo), wall
     time and the error against single-process attention. With fewer cores than actors the time
     cannot fall with N; the table shows exactness and what the ring costs here.
  3. KV capacity of an LLM group with a fixed per-rank budget: grows linearly with N.

  python benchmarks/scaling_cpu.py [--tokens 4096] [--world-sizes 1,2,4,8]
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

from ringserve.parallel import layout


def rank_tiles(total: int, n: int, rank: int, schedule: str, block: int) -> int:
    """Tiles of causal attention rank `rank` computes: its query tiles against every rank's keys,
    counting a tile when any (query, key) pair in it is visible (k_pos <= q_pos)."""
    me = layout.shard(total, n, rank, schedule)
    if me.length == 0:
        return 0
    q_tiles = torch.arange(0, me.length, block)
    q_last = torch.clamp(q_tiles + block - 1, max=me.length - 1)
    q_max_pos = me.offset + q_last * me.stride  # positions grow with the row index
    tiles = 0
    for src in range(n):
        sh = layout.shard(total, n, src, schedule)
        if sh.length == 0:
            continue
        n_k_tiles = math.ceil(sh.length / block)
        # key tile t starts at row t*block, position sh.offset + t*block*sh.stride; visible when
        # that first position <= the tile's last query position
        first_ok = torch.div(q_max_pos - sh.offset, sh.stride * block, rounding_mode="floor") + 1
        tiles += int(torch.clamp(first_ok, min=0, max=n_k_tiles).sum())
    return tiles


def balance_table(lengths, world_sizes, block):
    rows = []
    for total in lengths:
        t1 = rank_tiles(total, 1, 0, "ring", block)
        for n in world_sizes:
            for schedule in ("ring", "striped"):
                per = [rank_tiles(total, n, r, schedule, block) for r in range(n)]
                rows.append((total, n, schedule, max(per), min(per), t1 / (n * max(per))))
    print(f"\n1. work balance, causal, tiles of {block}x{block} (exact counts)")
    print(f"{'tokens':>9} {'N':>2} {'schedule':>8} {'max tiles':>10} {'min tiles':>10} "
          f"{'efficiency bound':>17}")
    for total, n, s, mx, mn, eff in rows:
        print(f"{total:>9} {n:>2} {s:>8} {mx:>10} {mn:>10} {eff:>16.1%}")
    return rows


def measured_table(tokens, world_sizes, heads, kv_heads, dim):
    import ray

    from ringserve.actors import ActorGroup
    from ringserve.kernels import attention
    from ringserve.parallel import distributed_attention

    torch.manual_seed(0)
    q = torch.randn(1, tokens, heads, dim)
    k = torch.randn(1, tokens, kv_heads, dim)
    v = torch.randn(1, tokens, kv_heads, dim)
    t = time.perf_counter()
    ref_out, ref_lse = attention(q, k, v, causal=True, backend="torch")
    t_single = time.perf_counter() - t
    rows = [("single process", 1, t_single, 0.0)]
    ray.init(address="local", num_cpus=max(world_sizes) + 1, include_dashboard=False,
             log_to_driver=False)
    try:
        for n in world_sizes:
            group = ActorGroup(n, device="cpu", num_cpus_per_worker=1)
            try:
                for schedule in ("ring", "striped"):
                    distributed_attention(q[:, :64], k[:, :64], v[:, :64], group=group,
                                          layout=schedule)  # warm-up
                    t = time.perf_counter()
                    out, lse = distributed_attention(q, k, v, group=group, layout=schedule)
                    dt = time.perf_counter() - t
                    err = float((out - ref_out).norm() / ref_out.norm())
                    if err > 1e-5:
                        raise AssertionError(f"N={n} {schedule}: relative error {err:.2e}")
                    rows.append((schedule, n, dt, err))
            finally:
                group.shutdown()
    finally:
        ray.shutdown()
    print(f"\n2. measured on this machine ({os.cpu_count()} cores): causal ring attention, "
          f"{tokens} tokens, {heads}/{kv_heads} heads x {dim}, fp32, Ray CPU actors over gloo")
    print(f"{'schedule':>15} {'N':>2} {'seconds':>8} {'rel. error':>11}")
    for s, n, dt, err in rows:
        print(f"{s:>15} {n:>2} {dt:>8.2f} {err:>11.1e}")
    return rows


def capacity_table(world_sizes, per_rank_bytes):
    import ray

    from ringserve import LLM
    from ringserve.demo_model import make_demo_model

    path = make_demo_model(os.path.join(tempfile.gettempdir(), "ringserve-scaling-demo"))
    rows = []
    ray.init(address="local", num_cpus=max(world_sizes) + 1, include_dashboard=False,
             log_to_driver=False)
    try:
        for n in world_sizes:
            llm = LLM(str(path), world_size=n, device="cpu", cpu_kv_bytes=per_rank_bytes)
            try:
                rows.append((n, llm.capacity_tokens))
            finally:
                llm.shutdown()
    finally:
        ray.shutdown()
    print(f"\n3. KV capacity of a group, {per_rank_bytes >> 20} MiB of KV per rank (demo model)")
    print(f"{'N':>2} {'capacity tokens':>16} {'per rank':>9}")
    for n, cap in rows:
        print(f"{n:>2} {cap:>16} {cap // n:>9}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", default="1,2,4,8")
    p.add_argument("--lengths", default="262144,524288,1048576")
    p.add_argument("--block", type=int, default=128, help="the kernel's tile (BLOCK_M = BLOCK_N)")
    p.add_argument("--tokens", type=int, default=4096, help="length of the measured run")
    p.add_argument("--heads", default="8/2", help="q heads / kv heads of the measured run")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--kv-mib-per-rank", type=int, default=64)
    p.add_argument("--skip-measured", action="store_true")
    a = p.parse_args(argv)
    ws = [int(x) for x in a.world_sizes.split(",")]
    balance_table([int(x) for x in a.lengths.split(",")], ws, a.block)
    if not a.skip_measured:
        hq, hkv = (int(x) for x in a.heads.split("/"))
        measured_table(a.tokens, ws, hq, hkv, a.dim)
        capacity_table(ws, a.kv_mib_per_rank << 20)


if __name__ == "__main__":
    main()
