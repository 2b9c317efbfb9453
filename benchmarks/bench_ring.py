"""Ring / striped attention prefill on 2 GPUs vs one GPU vs torch's context_parallel.

Causal attention only, Llama-3-8B shapes (32 q heads, 8 kv heads, head dim 128), bf16.
For each total length and per-block backend (--backends: our Triton kernel; cuDNN, which on one GPU
is torch SDPA's cuDNN kernel, the baseline): T1 (one call, one GPU), then on N GPUs for each
schedule:
  ring      the real thing (NCCL transfers overlapped with the kernel),
  compute   the same steps with a transport that moves nothing (compute-only time),
  comm      the same transfers with no compute (communication-only time),
parallel efficiency T1 / (N * TN) against the same backend's T1, and the share of communication hidden behind compute,
1 - (ring - compute) / comm. Last, torch.distributed.tensor.experimental.context_parallel on the
same shapes (SDPA, cuDNN backend if it runs else flash). Prints a table last.

  python benchmarks/bench_ring.py [--lengths 131072 262144 524288] [--with-1m] [--launcher auto]

Ranks are Ray GPU actors (ActorGroup + NcclTransport) when Ray imports, else
torch.multiprocessing processes running the same worker class with the same transport.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from ringserve import kernels
from ringserve.actors.worker import ShardWorker
from ringserve.parallel import layout
from ringserve.parallel.ring import RingStats, plan_ring, ring_attention
from ringserve.parallel.transport import Handle, Transport, TransportSpec, nccl_unique_id


class _Done(Handle):
    def wait(self, timeout_s=None):
        return None


class NoTransfer(Transport):
    """Same ranks, no data moved: the ring's compute-only time (buffers hold stale data)."""

    def __init__(self, real: Transport):
        self.rank, self.world_size, self.timeout_s = real.rank, real.world_size, real.timeout_s

    def send_recv(self, send_tensor, recv_tensor):
        return _Done()

    def close(self):
        pass


def causal_flops(total, hq, d):
    return 4.0 * hq * d * total * (total + 1) / 2  # QK^T and PV over the visible half


class BenchWorker(ShardWorker):
    """A shard worker with the benchmark's method; runs on each rank."""

    def _group_time(self, fn, reps, warmup):
        """Median over reps of the slowest rank's time for fn() started together."""
        t = self.transport
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t.barrier()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        every = t.all_gather(torch.tensor(times, device=self.device, dtype=torch.float64))
        slowest = torch.stack(every).amax(0).tolist()
        return statistics.median(slowest), slowest

    def _comm_only(self, moves, buf_a, buf_b):
        """The ring's transfers alone, step by step, alternating buffers like the ring."""
        t = self.transport
        for send, recv, send_len, recv_len in moves:
            if send or recv:
                t.send_recv(buf_a[:send_len] if send else None,
                            buf_b[:recv_len] if recv else None).wait()
            buf_a, buf_b = buf_b, buf_a

    def run_bench(self, cfg: dict) -> dict:
        torch.manual_seed(1234 + self.rank)
        n, rank, dev = self.world_size, self.rank, self.device
        hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
        dt = torch.bfloat16
        res = {"rank": rank, "device": torch.cuda.get_device_name(dev), "lengths": {}}
        log = lambda *a: print(f"[rank {rank}]", *a, flush=True)  # noqa: E731
        # compile + autotune once on a smaller problem of the same key (causal, TMA, bucket)
        if cfg["warmup_len"]:
            w = cfg["warmup_len"]
            q, k, v = (torch.randn(1, w, h, d, device=dev, dtype=dt) for h in (hq, hkv, hkv))
            kernels.attention(q, k, v, causal=True)
            torch.cuda.synchronize()
            del q, k, v
        if cfg.get("check"):
            res["check"] = self._check_exact(cfg, log)
        for total in cfg["lengths"]:
            reps = cfg["reps"] if total < 400_000 else cfg["large_reps"]
            warm = 1 if total == cfg["lengths"][0] else 0
            row = {"total": total, "flops": causal_flops(total, hq, d)}
            if rank == 0 and not cfg["skip_single"]:
                q, k, v = (torch.randn(1, total, h, d, device=dev, dtype=dt)
                           for h in (hq, hkv, hkv))
                for be in cfg["backends"]:  # cudnn here = torch SDPA's cuDNN kernel, 1 GPU
                    ts = []
                    for i in range(warm + reps):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        kernels.attention(q, k, v, causal=True, backend=be)
                        torch.cuda.synchronize()
                        if i >= warm:
                            ts.append(time.perf_counter() - t0)
                    row.setdefault("t1", {})[be] = statistics.median(ts)
                    row.setdefault("t1_all", {})[be] = ts
                    log(f"S={total} one GPU {be} {row['t1'][be] * 1e3:.1f} ms")
                del q, k, v
                torch.cuda.empty_cache()
            self.transport.barrier()
            for schedule in cfg["schedules"]:
                sh = layout.shard(total, n, rank, schedule)
                q = torch.randn(1, sh.length, hq, d, device=dev, dtype=dt)
                k = torch.randn(1, sh.length, hkv, d, device=dev, dtype=dt)
                v = torch.randn(1, sh.length, hkv, d, device=dev, dtype=dt)
                plan = plan_ring(total, n, rank, schedule, True, None)
                maxlen = max(s.length for s in plan.shards)
                buf_a = torch.empty(maxlen * 2 * hkv * d, device=dev, dtype=dt)
                buf_b = torch.empty_like(buf_a)
                unit = 2 * hkv * d  # elements per token of packed K+V
                moves = [(s.send, s.recv, s.send_len * unit, s.recv_len * unit)
                         for s in plan.steps]
                t_comm, _ = self._group_time(lambda: self._comm_only(moves, buf_a, buf_b),
                                             max(reps, 3), 1)
                nothing = NoTransfer(self.transport)
                for be in cfg["backends"]:
                    last = [RingStats()]

                    def ring():
                        last[0] = RingStats()  # the last call's counts (not summed over reps)
                        ring_attention(q, k, v, total, schedule, self.transport, True,
                                       stats=last[0], backend=be)

                    def compute():
                        ring_attention(q, k, v, total, schedule, nothing, True, backend=be)

                    t_ring, all_ring = self._group_time(ring, reps, warm)
                    t_comp, _ = self._group_time(compute, reps, warm)
                    stats = last[0]
                    row[f"{schedule}/{be}"] = {
                        "schedule": schedule, "backend": be, "t": t_ring, "t_all": all_ring,
                        "compute": t_comp, "comm": t_comm, "bytes_sent": stats.bytes_sent,
                        "steps_computed": stats.steps_computed}
                    log(f"S={total} {schedule}/{be}: ring {t_ring * 1e3:.1f} ms, compute-only "
                        f"{t_comp * 1e3:.1f}, comm-only {t_comm * 1e3:.1f}, sent "
                        f"{stats.bytes_sent / 2**20:.0f} MiB")
                del q, k, v, buf_a, buf_b
                torch.cuda.empty_cache()
            res["lengths"][total] = row
        if rank == 0:  # the ring numbers, in case the context_parallel part does not finish
            print(table([res], cfg, n, "(ring part)"), flush=True)
        if not cfg["skip_cp"]:
            res["context_parallel"] = self._bench_cp(cfg, log)
        return res

    def _check_exact(self, cfg, log, total=8192, hq=8, hkv=2):
        """bf16 ring over NCCL vs one-GPU kernel vs float64, every schedule (rule: at most 2x
        the error of plain bf16 PyTorch attention, + 1e-3). Same kernel keys as the timing."""
        from ringserve.kernels.reference import attention_ref

        n, rank, dev, d = self.world_size, self.rank, self.device, cfg["d"]
        g = torch.Generator(device="cpu").manual_seed(42)  # the same full tensors on every rank
        q, k, v = (torch.randn(1, total, h, d, generator=g).to(dev, torch.bfloat16)
                   for h in (hq, hkv, hkv))
        out = {}
        for schedule, be in ((s, b) for s in cfg["schedules"] for b in cfg["backends"]):
            parts = [layout.split(x, n, schedule)[rank].contiguous() for x in (q, k, v)]
            o, lse = ring_attention(*parts, total, schedule, self.transport, True, backend=be)
            outs = self.transport.all_gather(o.contiguous())   # equal shard sizes: total % n == 0
            lses = self.transport.all_gather(lse.contiguous())
            if rank == 0:
                full_o = layout.gather(list(outs), schedule, 1)
                full_l = layout.gather(list(lses), schedule, 2)
                ref_o, ref_l = attention_ref(q, k, v, None, True, None)
                one_o, _ = kernels.attention(q, k, v, causal=True, backend=be)
                kk, vv = (x.repeat_interleave(hq // hkv, 2) for x in (k, v))
                s_ = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(d)
                s_ = s_.masked_fill(torch.ones(total, total, dtype=torch.bool, device=dev)
                                    .triu(1), float("-inf"))
                plain = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s_, -1), vv)
                err = lambda x: (x.double() - ref_o).abs().max().item()  # noqa: E731
                e = {"ring": err(full_o), "one_gpu": err(one_o), "plain_bf16": err(plain),
                     "lse": (full_l - ref_l).abs().max().item()}
                e["ok"] = bool(e["ring"] <= 2 * e["plain_bf16"] + 1e-3 and e["lse"] < 2e-2)
                out[f"{schedule}/{be}"] = e
                log(f"check {schedule}/{be} S={total}: max err ring {e['ring']:.2e}, one GPU "
                    f"{e['one_gpu']:.2e}, plain bf16 {e['plain_bf16']:.2e}, lse "
                    f"{e['lse']:.2e} -> {'OK' if e['ok'] else 'FAIL'}")
                del ref_o, ref_l, s_, plain
        torch.cuda.empty_cache()
        return out

    # ---- torch's context_parallel on the same shapes ----

    def _bench_cp(self, cfg, log):
        import datetime
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.nn.attention import SDPBackend, sdpa_kernel

        n, rank, dev = self.world_size, self.rank, self.device
        hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
        # rendezvous for torch.distributed: rank 0's store port travels over our transport
        store = None
        port = torch.zeros(1, dtype=torch.int64, device=dev)
        if rank == 0:
            store = dist.TCPStore("127.0.0.1", 0, n, True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=120))
            port.fill_(store.port)
        port = int(self.transport.all_gather(port)[0].item())
        if store is None:
            store = dist.TCPStore("127.0.0.1", port, n, False,
                                  timeout=datetime.timedelta(seconds=120))
        dist.init_process_group("nccl", store=store, rank=rank, world_size=n, device_id=dev,
                                timeout=datetime.timedelta(seconds=180))
        mesh = init_device_mesh("cuda", (n,))
        out = {"modes": {}}
        backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}

        def inputs(total, gqa):
            g = torch.Generator(device=dev).manual_seed(total)  # same on every rank
            q, k, v = (torch.randn(1, h, total, d, device=dev, dtype=torch.bfloat16, generator=g)
                       for h in (hq, hkv, hkv))
            return q, k, v

        def attempt(total, backend, gqa, reps, warm):
            """(median slowest-rank time or None, this rank's output shard)."""
            q, k, v = inputs(total, gqa)
            kw = {"enable_gqa": True} if gqa else {}  # only where needed: older SDPA lacks it
            if not gqa and hkv != hq:  # MHA form of the same problem: K/V heads repeated
                k = k[:, : hkv].repeat_interleave(hq // hkv, 1).contiguous()
                v = v[:, : hkv].repeat_interleave(hq // hkv, 1).contiguous()
            ts = []
            with sdpa_kernel([backends[backend]]):
                with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2],
                                      no_restore_buffers={q, k, v}):
                    for i in range(warm + reps):
                        dist.barrier()
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
                        torch.cuda.synchronize()
                        if i >= warm:
                            ts.append(time.perf_counter() - t0)
            slow = torch.tensor(ts or [0.0], device=dev, dtype=torch.float64)
            dist.all_reduce(slow, op=dist.ReduceOp.MAX)
            return (statistics.median(slow.tolist()) if ts else None), o

        # Which SDPA backend and GQA handling run under context_parallel here: a small probe.
        # Every mode shards the same rows the same way, so each one's output shard is checked
        # against the flash backend on the MHA form (K/V heads repeated), row for row.
        try:
            _, ref = attempt(8192, "flash", False, 0, 1)
        except Exception as e:  # noqa: BLE001 - then a mode only has to run and stay finite
            ref = None
            log(f"context_parallel flash/mha reference failed: {e!r:.200}")
        mode = None
        for backend, gqa in (("cudnn", True), ("flash", True), ("cudnn", False),
                             ("flash", False)):
            name = f"{backend}/{'gqa' if gqa else 'mha'}"
            try:
                _, o = attempt(8192, backend, gqa, 0, 1)
                if ref is not None:
                    err = (o.float() - ref.float()).abs().max().item()
                else:
                    err = 0.0 if bool(torch.isfinite(o).all()) else float("inf")
                ok = err < 2e-2
                out["modes"][name] = err
                log(f"context_parallel probe {name}: max diff vs flash/mha {err:.2e}")
            except Exception as e:  # noqa: BLE001 - a backend may not support this case
                ok = False
                out["modes"][name] = repr(e)[:200]
                log(f"context_parallel probe {name} failed: {e!r:.200}")
            flag = torch.tensor([1 if ok else 0], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item():
                mode = (backend, gqa)
                break
        del ref
        out["mode"] = mode and f"{mode[0]}/{'gqa' if mode[1] else 'mha (K/V repeated to 32 heads)'}"
        out["t"] = {}
        if mode:
            for total in cfg["lengths"]:
                reps = cfg["reps"] if total < 400_000 else cfg["large_reps"]
                try:
                    t, _ = attempt(total, mode[0], mode[1], reps, 1 if total < 400_000 else 0)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: keep the rest
                    t = None
                    log(f"context_parallel S={total} failed: {e!r:.200}")
                out["t"][total] = t
                torch.cuda.empty_cache()
                if t:
                    log(f"context_parallel S={total}: {t * 1e3:.1f} ms")
        dist.destroy_process_group()
        return out


def _mp_rank(rank, world, uid, cfg, queue):
    torch.cuda.set_device(rank)
    w = BenchWorker(rank, world, "cuda")
    w.setup_transport(TransportSpec("nccl", unique_id=uid, timeout_s=cfg["timeout_s"]))
    try:
        queue.put(w.run_bench(cfg))
    finally:
        w.shutdown()


def run_mp(cfg, world):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    uid = nccl_unique_id()
    procs = [ctx.Process(target=_mp_rank, args=(r, world, uid, cfg, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = []
    deadline = time.monotonic() + cfg["timeout_s"] * 4
    while len(results) < world and time.monotonic() < deadline:
        try:
            results.append(queue.get(timeout=5))
        except Exception:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
    for p in procs:
        p.join(30)
    if len(results) < world:
        raise RuntimeError(f"ranks failed: exit codes {[p.exitcode for p in procs]}")
    return sorted(results, key=lambda r: r["rank"])


def run_ray(cfg, world):
    import ray
    from ringserve.actors import ActorGroup

    ray.init(num_gpus=world, num_cpus=2 * world, include_dashboard=False, log_to_driver=True)
    try:
        g = ActorGroup(world, device="cuda", worker_cls=BenchWorker, num_cpus_per_worker=1,
                       transport_timeout_s=cfg["timeout_s"], placement_timeout_s=120)
        try:
            return g.call("run_bench", cfg)
        finally:
            g.shutdown()
    finally:
        ray.shutdown()


def table(results, cfg, world, launcher):
    r0 = results[0]
    lines = [f"ring attention bench: {r0['device']} x{world}, launcher {launcher}, causal, bf16, "
             f"Hq {cfg['hq']} Hkv {cfg['hkv']} D {cfg['d']}"]
    cp = r0.get("context_parallel") or {}
    lines.append(f"context_parallel mode: {cp.get('mode')}  (probe errors: {cp.get('modes')})")
    if r0.get("check"):
        lines.append("bf16 check (max abs err vs float64): " + "; ".join(
            f"{k} ring {v['ring']:.1e} / plain bf16 {v['plain_bf16']:.1e} "
            f"{'OK' if v['ok'] else 'FAIL'}" for k, v in r0["check"].items()))
    hdr = (f"{'tokens':>8} {'backend':>7} {'1 GPU ms':>9} {'TF/s':>5} | {'schedule':>8} "
           f"{'ring ms':>8} {'TF/s':>5} {'eff':>6} {'compute':>8} {'comm':>7} {'exposed':>7} "
           f"{'hidden':>6} | {'ctx_par ms':>10} {'cp/ring':>7}")
    lines += [hdr, "-" * len(hdr)]
    nan = float("nan")
    for total, row in r0["lengths"].items():
        tcp = (cp.get("t") or {}).get(total) or (cp.get("t") or {}).get(str(total))
        for be in cfg["backends"]:
            t1 = (row.get("t1") or {}).get(be)
            for schedule in cfg["schedules"]:
                s = row[f"{schedule}/{be}"]
                eff = t1 / (world * s["t"]) if t1 else nan
                hidden = 1 - (s["t"] - s["compute"]) / s["comm"] if s["comm"] > 0 else nan
                hidden = min(1.0, max(0.0, hidden))
                lines.append(
                    f"{int(total):>8} {be:>7} {t1 * 1e3 if t1 else nan:>9.1f} "
                    f"{row['flops'] / t1 / 1e12 if t1 else nan:>5.0f} | {schedule:>8} "
                    f"{s['t'] * 1e3:>8.1f} {row['flops'] / s['t'] / 1e12:>5.0f} {eff:>6.1%} "
                    f"{s['compute'] * 1e3:>8.1f} {s['comm'] * 1e3:>7.1f} "
                    f"{(s['t'] - s['compute']) * 1e3:>7.1f} {hidden:>6.1%} | "
                    f"{tcp * 1e3 if tcp else nan:>10.1f} "
                    f"{(tcp / s['t']) if tcp else nan:>7.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288])
    p.add_argument("--with-1m", action="store_true", help="also 1,048,576 tokens")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="timed runs below 400K tokens")
    p.add_argument("--large-reps", type=int, default=2, help="timed runs from 400K tokens")
    p.add_argument("--schedules", nargs="+", default=["striped", "ring"])
    p.add_argument("--backends", nargs="+", default=["triton", "cudnn"],
                   help="per-block attention: our Triton kernel, and/or cuDNN where its masks "
                        "express the block (1-GPU cudnn = torch SDPA's cuDNN kernel)")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--warmup-len", type=int, default=32768)
    p.add_argument("--launcher", choices=["auto", "ray", "mp"], default="auto")
    p.add_argument("--skip-cp", action="store_true")
    p.add_argument("--skip-single", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="first check bf16 exactness of each schedule at 8192 tokens")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--json", default=None, help="write all numbers here")
    a = p.parse_args(argv)
    lengths = list(a.lengths) + ([1 << 20] if a.with_1m else [])
    cfg = dict(lengths=lengths, reps=a.reps, large_reps=a.large_reps, schedules=a.schedules,
               backends=a.backends,
               hq=a.hq, hkv=a.hkv, d=a.d, warmup_len=a.warmup_len, skip_cp=a.skip_cp,
               skip_single=a.skip_single, timeout_s=a.timeout_s, check=a.check)
    if torch.cuda.device_count() < a.world:
        sys.exit(f"needs {a.world} GPUs, found {torch.cuda.device_count()}")
    launcher = a.launcher
    if launcher == "auto":
        try:
            import ray  # noqa: F401
            launcher = "ray"
        except ImportError:
            launcher = "mp"
    t0 = time.time()
    if launcher == "ray":
        try:
            results = run_ray(cfg, a.world)
        except Exception as e:  # noqa: BLE001 - the numbers matter more than the launcher
            if a.launcher == "ray":
                raise
            print(f"Ray launcher failed ({e!r:.300}); again with torch.multiprocessing",
                  flush=True)
            launcher = "mp"
    if launcher == "mp":
        results = run_mp(cfg, a.world)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cfg": cfg, "launcher": launcher, "results": results,
                       "wall_s": time.time() - t0}, f, indent=1, default=str)
    print(table(results, cfg, a.world, launcher), flush=True)


if __name__ == "__main__":
    main()
