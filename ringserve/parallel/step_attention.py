"""Attention for one engine step's flat token batch on one rank (see `ringserve.plan`).

`StepAttention(plan, pool, ...)` is the model's `attn_fn` for the step. Per layer it

1. writes the K/V of the tokens this rank owns into its pool (one scatter for the whole batch);
2. pass-Q rows (decodes, short extensions; the same rows on every rank): attends them to this
   rank's cache with the paged flash-decoding kernel (all one-token rows in one batched launch;
   rows sharing a cached document read its pages once: cascade attention, prefix part and
   own-suffix part merged by log-sum-exp), then all-gathers the partial (out, lse) of every
   pass-Q row at once and merges them in rank order, so every rank continues with the same rows;
3. ring rows (a prefill chunk sharded by the layout): ring attention within the chunk, and, when
   earlier chunks of the prompt are cached, pass-Q of the chunk's queries against them
   (all-gather the queries, attend locally, all-gather the partials, keep one's own rows),
   merged with the chunk part by log-sum-exp.

Every collective is issued in plan order, identical on every rank.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ringserve import kernels
from ringserve.plan import RankPlan
from .ring import ring_attention

# a chunk's attention to its sequence's cached tokens: gathered PIECE_TOKENS at a time, each
# piece split into up to SPLITS key ranges of at least MIN_SPLIT_TOKENS run as one launch
# (only as many splits as it takes to give the GPU about TARGET_PROGRAMS query-block programs:
# a long chunk fills it alone, and every split costs a merge)
PIECE_TOKENS = 65536
# read a chunk's cached prefix as views of the pool when its pages form at most MAX_VIEW_RUNS
# runs of consecutive pages (one per run, no copy); more fragmented prefixes are gathered
CONTIGUOUS_VIEWS = True
MAX_VIEW_RUNS = 8
SPLITS = 8
MIN_SPLIT_TOKENS = 2048
# one rank, no window: a chunk whose prefix and own tokens sit in one run of pages and that
# fills the GPU alone (one split) attends in one causal launch over both, its queries offset
# by the prefix: no second launch for the prefix, no merge. Session 25: the merge of a 128K
# prefill's late chunks took 267 ms of its 11.1 s on an H200 (0.2-1.2 ms a layer)
WHOLE_RUN_CHUNKS = True
TARGET_PROGRAMS = 512
# MLA (DeepSeek-V2): a ring chunk of at least this many tokens attends in the expanded form
# (`StepAttention.mla`; fewer queries stay absorbed: the keys' expansion would cost more than it
# saves). Its cached prefix is expanded MLA_PIECE_TOKENS at a time (a piece's expanded K and V
# are ~12 KiB a token for V2-Lite's 16 heads)
MLA_EXPAND_MIN_TOKENS = 128
MLA_PIECE_TOKENS = 32768


def split_count(n: int, rows: int, heads: int) -> int:
    """How many equal key ranges a chunk's `rows` queries split n cached keys into: about
    TARGET_PROGRAMS query-block programs in all, at most SPLITS, each at least MIN_SPLIT_TOKENS;
    a power of two, so that a prefix of whole 128-token chunks splits with no remainder (an
    odd count left a 1-token remainder: a third flash launch and merge a layer, session 9)."""
    want = max(1, min(SPLITS, n // MIN_SPLIT_TOKENS, -(-TARGET_PROGRAMS // (-(-rows // 128)
                                                                             * heads))))
    up = 1 << (want - 1).bit_length()
    return up if up <= min(SPLITS, max(1, n // MIN_SPLIT_TOKENS)) else up >> 1


def page_runs(table: torch.Tensor) -> List[Tuple[int, int]]:
    """The runs of consecutive page numbers in a (CPU) page table: [(first, count), ...]
    (vectorized: a late chunk's table has ~12K pages, a Python loop over them was ~1 ms a
    step)."""
    n = table.numel()
    if n == 0:
        return []
    t = table.reshape(-1).to(torch.int64)
    cut = (torch.nonzero(t[1:] - t[:-1] != 1).reshape(-1) + 1).tolist()
    starts = [0] + cut
    ends = cut + [n]
    firsts = t[starts].tolist()
    return [(f, e - a) for f, a, e in zip(firsts, starts, ends)]


def view_pieces(runs: List[Tuple[int, int]], n: int, page: int, cap: int):
    """The first n tokens of a sequence whose pages are `runs`, as (a, b, first page) pieces of
    at most `cap` tokens (a multiple of the page size), each inside one run."""
    out, a = [], 0
    for first, count in runs:
        end = min(n, a + count * page)
        while a < end:
            b = min(end, a + cap)
            out.append((a, b, first))
            first += (b - a) // page
            a = b
        if a >= n:
            break
    return out


def ints(x) -> np.ndarray:
    """A plan's per-token field (a list, or an int array for a ring chunk) as int64."""
    return np.asarray(x, dtype=np.int64)


def _rows4(x: torch.Tensor, r: slice) -> torch.Tensor:
    """x[r][None] (rows r of x (T, H, D) as (1, n, H, D), the strides unsqueeze gives) in
    one view op instead of two."""
    s0, s1, s2 = x.stride()
    n = r.stop - r.start
    return x.as_strided((1, n, x.shape[1], x.shape[2]), (n * s0, s0, s1, s2),
                        x.storage_offset() + r.start * s0)


def to_device(x, dev: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A Python list or CPU tensor on dev without a blocking copy: through pinned memory on
    CUDA (a copy from pageable memory is a round trip that waits for the device; a step's
    set-up makes a dozen of them)."""
    t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)
    if dev.type != "cuda" or t.numel() == 0:
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def _as_slice(rows: List[int]) -> Optional[slice]:
    """rows as a slice when they are consecutive and ascending (no gather needed), else None."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return None


def _merge(out_a, lse_a, out_b, lse_b):
    """out (R, H, D) float32, lse (R, H) float32: merge b into a in place (the log-sum-exp
    rule; a row with lse -inf on one side takes the other side unchanged). One Triton launch
    on the GPU (the torch path is some twenty kernels: in a launch-bound decode step, with a
    merge per layer for every cascade group and rank, that was a tenth of the step)."""
    kernels.merge_(out_a[None], lse_a.t()[None], out_b[None], lse_b.t()[None])


def merge_rows(transport, o: torch.Tensor, lse: torch.Tensor):
    """All-gather every rank's partial (out (R, H, D), lse (R, H)) of the same rows, merge them
    in rank order: every rank ends with the same rows, bit for bit."""
    n = o.numel()
    # stream-ordered on NCCL: the merge waits on the GPU, not the host; the step's one
    # transport.synchronize bounds the wait
    parts = transport.all_gather(torch.cat([o.reshape(-1), lse.reshape(-1)]), blocking=False)
    acc_o = parts[0][:n].view(o.shape).clone()
    acc_l = parts[0][n:].view(lse.shape).clone()
    for p in parts[1:]:
        _merge(acc_o, acc_l, p[:n].view(o.shape), p[n:].view(lse.shape))
    return acc_o, acc_l


class StepAttention:
    def __init__(self, plan: RankPlan, tables: List[torch.Tensor], pool, rank: int,
                 world_size: int, transport, softmax_scale: float, window_size,
                 backend: str, softcap: Optional[float] = None,
                 mla_expand_min: Optional[int] = None):
        """tables[i]: sequence i's page table on this rank after the step (CPU int32).
        window_size: an int or None for every layer, or a tuple with one per layer (Gemma);
        softcap: the kernels' score soft-capping (Gemma 2); mla_expand_min: MLA's latent cache
        only (the pool's values are its keys): ring chunks of at least this many tokens attend
        in the expanded form (`mla`), None: never."""
        self.plan, self.pool = plan, pool
        self.rank, self.world_size, self.transport = rank, world_size, transport
        self.scale, self.window, self.backend = softmax_scale, window_size, backend
        self.softcap = softcap
        self.layer_windows = window_size if isinstance(window_size, (tuple, list)) else None
        dev = pool.k.device
        i32, i64 = torch.int32, torch.int64

        def on_dev(x, dtype=None):
            return to_device(x, dev, dtype)
        # row ranges of each sequence in the flat batch
        self.rows: List[slice] = []
        a = 0
        for s in plan.seqs:
            self.rows.append(slice(a, a + len(s.token_ids)))
            a += len(s.token_ids)
        self.num_rows = a
        # one scatter of every owned token per layer
        if any(isinstance(s.token_ids, np.ndarray) for s in plan.seqs):
            # a ring chunk's fields are int arrays (the scheduler's, for long chunks): the
            # same tensors without Python per token
            w_rows_a = np.concatenate([r.start + ints(s.write_rows)
                                       for s, r in zip(plan.seqs, self.rows)])
            w_slots_a = np.concatenate([ints(s.slots) for s in plan.seqs])
            w_pos_a = np.concatenate([ints(s.positions)[ints(s.write_rows)]
                                      for s in plan.seqs])
            self.w_rows = on_dev(torch.from_numpy(w_rows_a))
            self.w_slots = on_dev(torch.from_numpy(w_slots_a))
            self.write_all = len(w_rows_a) == a and bool(
                (w_rows_a == np.arange(a, dtype=np.int64)).all())
            if self.write_all:
                self.row_slots = self.w_slots
            else:
                row_slots = np.full(a, -1, dtype=np.int64)
                row_slots[w_rows_a] = w_slots_a
                self.row_slots = on_dev(torch.from_numpy(row_slots))
            w_pos = torch.from_numpy(w_pos_a)
            all_pos = torch.from_numpy(np.concatenate([ints(s.positions) for s in plan.seqs]))
        else:
            w_rows, w_slots, w_pos = [], [], []
            for s, r in zip(plan.seqs, self.rows):
                w_rows += [r.start + i for i in s.write_rows]
                w_slots += s.slots
                w_pos += [s.positions[i] for i in s.write_rows]
            self.w_rows = on_dev(w_rows, i64)
            self.w_slots = on_dev(w_slots, i64)
            self.write_all = w_rows == list(range(a))
            # every row's slot, -1 where this rank does not store it (the fused RoPE + store)
            if self.write_all:
                self.row_slots = self.w_slots
            else:
                row_slots = [-1] * a
                for r, sl in zip(w_rows, w_slots):
                    row_slots[r] = sl
                self.row_slots = on_dev(row_slots, i64)
            all_pos = [p for s in plan.seqs for p in s.positions]
        self._stored = -1     # the layer whose K/V rope_store has written
        pool.set_positions(self.w_slots, on_dev(w_pos, i64))
        page = pool.page_size
        # pass-Q one-token rows: one batched decode launch (suffix tables after cascade prefix)
        self.dec = [i for i, s in enumerate(plan.seqs) if s.kind == "q" and len(s.token_ids) == 1]
        self.ext = [i for i, s in enumerate(plan.seqs) if s.kind == "q" and len(s.token_ids) > 1]
        self.ring = [i for i, s in enumerate(plan.seqs) if s.kind == "ring"]
        if self.dec:
            # one-token rows of a cascade group read their shared pages in the group's launch
            skip = [plan.groups[plan.seqs[i].group][1] if plan.seqs[i].group >= 0 else 0
                    for i in self.dec]
            empty = torch.zeros(1, dtype=torch.int32)
            tabs = [tables[i][k:] if tables[i].numel() > k else empty
                    for i, k in zip(self.dec, skip)]
            self.dec_table = on_dev(torch.nn.utils.rnn.pad_sequence(tabs, batch_first=True))
            self.dec_lens = on_dev([plan.seqs[i].n_after - k * page
                                    for i, k in zip(self.dec, skip)], i32)
            # the scheduler puts the decode rows first, in order: a slice, not a gather
            starts = [self.rows[i].start for i in self.dec]
            self.dec_slice = _as_slice(starts)
            self.dec_rows = None if self.dec_slice else on_dev(starts, i64)
            self.dec_qpos = on_dev([[plan.seqs[i].positions[0]] for i in self.dec], i64)
            self.groups = []
            index = {s.seq: i for i, s in enumerate(plan.seqs)}
            for g, (key, k) in enumerate(plan.groups):
                members = [j for j, i in enumerate(self.dec) if plan.seqs[i].group == g]
                qpos = [[plan.seqs[self.dec[j]].positions[0] for j in members]]
                # None: the group is every decode row, in order (the usual case: many
                # questions on one document): no gathers and scatters of its rows per layer
                self.groups.append((on_dev(tables[index[key]][:k][None]),
                                    on_dev([k * page], i32),
                                    None if members == list(range(len(self.dec)))
                                    else on_dev(members, i64),
                                    on_dev(qpos, i64)))
        self.tables = {i: on_dev((tables[i] if tables[i].numel() else
                                  torch.zeros(1, dtype=torch.int32))[None])
                       for i in self.ext + self.ring}
        # a ring chunk whose cached prefix sits in a few runs of consecutive pages (the
        # allocator keeps a prompt's pages together) reads it as views of the pool, one per
        # run, not as a gathered copy: {seq index: [(first page, pages), ...]}
        self.prefix_run: Dict[int, List[Tuple[int, int]]] = {}
        for i in self.ring:
            np_ = -(-plan.seqs[i].n_before // page)
            runs = page_runs(tables[i][:np_]) if CONTIGUOUS_VIEWS and np_ else None
            if runs and sum(n for _, n in runs) == np_ and len(runs) <= MAX_VIEW_RUNS:
                self.prefix_run[i] = runs
        # {seq index: first page} of the ring chunks (one rank) whose prefix and own tokens
        # are one run of pages from that page: token t at slot first * page + t
        self.whole_run: Dict[int, int] = {}
        if WHOLE_RUN_CHUNKS and world_size == 1 and pool.v is not pool.k:
            for i in self.ring:
                sq = plan.seqs[i]
                n = sq.n_before + len(sq.token_ids)
                run = page_runs(tables[i][:-(-n // page)]) if sq.n_before else None
                if run and len(run) == 1 and run[0][1] * page >= n and len(sq.slots) \
                        and int(sq.slots[0]) == run[0][0] * page + sq.n_before \
                        and int(sq.slots[-1]) == run[0][0] * page + n - 1:
                    self.whole_run[i] = run[0][0]
        self.q_rows = [i for i in range(len(plan.seqs)) if plan.seqs[i].kind == "q"]
        qi = [r for i in self.q_rows for r in range(self.rows[i].start, self.rows[i].stop)]
        self.q_slice = _as_slice(qi)
        self.q_index = None if self.q_slice else on_dev(qi, i64)
        self.positions = on_dev(all_pos, i64)
        self._seq_pos: Dict[int, torch.Tensor] = {}     # seq_pos(i), made at first use
        # fast paths of the common steps (a decode batch, a lone chunk): skip the gathers and
        # scatters that would be identities; every op counts in a launch-bound eager step
        self.only_dec = bool(self.dec) and len(self.dec) == len(plan.seqs)
        self.ext_lens = {i: on_dev([plan.seqs[i].n_after], i32) for i in self.ext}
        # the common serving step's decode rows: many questions on one cached document, one
        # rank: both attention parts merged in one launch into the step's output
        self.cascade_into_out = (world_size == 1 and bool(self.dec) and not self.ext
                                 and self.dec_slice is not None
                                 and len(self.groups) == 1 and self.groups[0][2] is None)
        # MLA: the ring chunks attended in the expanded form (decided from the chunk's whole
        # length: the same on every rank, whose ring and pass-Q collectives must agree)
        self.expand = frozenset(
            i for i in self.ring
            if mla_expand_min is not None and pool.v is pool.k and window_size is None
            and plan.seqs[i].chunk_len >= mla_expand_min)

    @property
    def mla_expands(self) -> bool:
        """True when the model should call `mla` (with the expanded queries) this step."""
        return bool(self.expand)

    def seq_pos(self, i: int) -> torch.Tensor:
        """Sequence i's positions in this step (int64, on the device) as a tensor of its own,
        made once per step when first needed (extensions, windowed or multi-rank chunks; a
        one-rank chunk without a window never reads them): a slice of `positions` at an odd
        row is not 16-byte aligned, and the paged kernel specializes on its pointer's alignment
        (a compile in the middle of serving, seen on an H200 in session 9)."""
        t = self._seq_pos.get(i)
        if t is None:
            t = self._seq_pos[i] = to_device(self.plan.seqs[i].positions,
                                             self.pool.k.device, torch.int64)
        return t

    @property
    def _paged_kw(self) -> dict:
        """paged_decode's arguments besides the rows, tables, lengths and positions (a rank
        caches a sequence's tokens in position order: positions_sorted)."""
        return dict(softmax_scale=self.scale, causal=True, window_size=self.window,
                    kv_pos=self.pool.kv_pos, softcap=self.softcap, positions_sorted=True)

    def _paged(self, layer, q, table, lens, q_pos, shared: bool = False):
        """paged_decode of rows q over tables; shared: a shared document's pages under rows
        that decode after it (`kernels.shared_prefix_kw`: no mask without a window)."""
        k_layer, v_layer = self.pool.layers[layer]
        kw = kernels.shared_prefix_kw(self._paged_kw) if shared else self._paged_kw
        return kernels.paged_decode(q, k_layer, v_layer, table, lens, q_pos=q_pos,
                                    backend=self.backend, check=False, **kw)

    def rope_store(self, layer: int, q, k, v, cos, sin, **norm):
        """The model's fused prologue (Triton): q, k (T, H, D) rotated (and q/k-normed with
        `norm`), and this rank's rows of k, v stored into the layer's pool in the same launch;
        the call for this layer then stores nothing. Returns q, k rotated and v copied
        contiguous."""
        from ringserve.kernels.fused import rope_store_triton
        out = rope_store_triton(q, k, v, cos, sin, *self.pool.slot_views(layer),
                                self.row_slots, **norm, check=False)
        self._stored = layer
        return out

    def rope_store_rows(self, layer: int, rows: slice, q, k, v, cos, sin, out, **norm):
        """`rope_store` for the step's rows `rows` only (the model's long steps run their
        projections span by span): q, k, v, cos, sin are those rows', rotated into `out` =
        (q, k, v) (the rows of the layer's whole-step buffers), and the rows' keys and values
        stored into the layer's pool. The call for this layer stores nothing once the model
        has stored every span."""
        from ringserve.kernels.fused import rope_store_triton
        rope_store_triton(q, k, v, cos, sin, *self.pool.slot_views(layer),
                          self.row_slots[rows], **norm, check=False, out=out)
        self._stored = layer

    def latent_slots(self, layer: int):
        """MLA's fused prologue (`MLAttention.project`, Triton): the layer's flat cache slots
        (N, 1, latent_dim) and each row's slot (-1 where this rank does not store it), which
        its launch stores the latent key into; the call for this layer then stores nothing."""
        self._stored = layer
        return self.pool.slot_views(layer)[0], self.row_slots

    # the model calls this with q (T, Hq, D), k, v (T, Hkv, D) and takes (T, Hq, D) back,
    # without the batch dimension of its general attn_fn contract (two view ops a tensor a
    # layer in a launch-bound step)
    flat_batch = True

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q (T, Hq, D), k, v (T, Hkv, D) -> (T, Hq, D) (`flat_batch`)."""
        self._store(layer, k, v)
        return self._attend(layer, q, k, v)

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.layer_windows is not None:              # this layer's window (Gemma)
            self.window = self.layer_windows[layer]
        if self._stored == layer:                       # rope_store wrote them
            pass
        elif self.write_all:
            self.pool.write(layer, self.w_slots, k, v)
        else:
            self.pool.write(layer, self.w_slots, k.index_select(0, self.w_rows),
                            v.index_select(0, self.w_rows))

    def mla(self, layer: int, q: torch.Tensor, k: torch.Tensor, q_exp: torch.Tensor, mod):
        """MLA's step (when `mla_expands`): q (T, Hq, latent_dim) absorbed, k (T, 1,
        latent_dim) the latent (stored, and passed around the ring as it is), q_exp (T, Hq,
        qk_head_dim) the expanded queries, mod the layer's `MLAttention` (its expand_kv and
        to_values) -> (T, Hq, v_head_dim), the output in the values' space.

        The chunks in `expand` attend in the expanded form: each rank expands the latent
        blocks it holds or receives to per-head K and V and runs the flash kernel with keys
        qk_head_dim and values v_head_dim wide; every other row (decodes, extensions, short
        chunks) attends absorbed, its output then projected by W_UV."""
        self._store(layer, k, k)
        T, Hq = q.shape[:2]
        if len(self.expand) < len(self.plan.seqs):
            # the absorbed rows, projected in one GEMM over every row (row by row, whatever
            # the expanded chunks' unwritten rows of lat hold); those rows are written below
            out = mod.to_values(self._attend(layer, q, k, k, skip=self.expand))
        else:
            out = torch.empty(T, Hq, mod.mla.v_head_dim, dtype=q.dtype, device=q.device)
        for i in sorted(self.expand):
            r = self.rows[i]
            self._ring_chunk_expanded(layer, i, q_exp[r], k[r], out[r], mod.expand_kv)
        return out

    def _attend(self, layer: int, q, k, v, skip=frozenset()):
        """The step's attention after the K/V store (`__call__`); the ring chunks in skip are
        left to the caller (their rows of the output are not written)."""
        if self.only_dec and not self.cascade_into_out:  # rows = the decode batch, in order
            o, lse = self._pass_q(layer, q, merged=self.world_size > 1)
            if self.world_size > 1:
                o, lse = self._merge_ranks(o, lse)
            return o if o.dtype == q.dtype else o.to(q.dtype)
        out = torch.empty_like(q)
        if self.cascade_into_out:   # one rank, one shared document under every decode row
            self._cascade_into(layer, q, out[self.dec_slice])
        elif self.q_rows:
            o, lse = self._pass_q(layer, q)              # (Rq, Hq, D) f32, (Rq, Hq) f32
            if self.world_size > 1:
                o, lse = self._merge_ranks(o, lse)
            if self.q_slice:
                out[self.q_slice] = o                    # one copy, cast in it
            else:
                out.index_copy_(0, self.q_index, o.to(q.dtype))
        for i in self.ring:
            if i in skip:
                continue
            r = self.rows[i]
            self._ring_chunk(layer, i, q[r], _rows4(k, r), _rows4(v, r), out[r])
        return out

    # ---- pass-Q rows ----

    def _cascade_into(self, layer: int, q: torch.Tensor, dest: torch.Tensor) -> None:
        """The decode rows (one rank; all of them one cascade group): each row's own pages
        and the shared document's pages read once for all, both left as their kernels' split
        partials (no reduce launches) and all merged in one launch written straight into
        dest, the step's output rows (session 7: two reduces, a merge into a float32 buffer,
        a cast and a copy a layer before)."""
        # the decode rows of q as (B, 1, Hq, D) and (1, B, Hq, D), one view op each (with the
        # strides q[rows][:, None] and q[rows][None] have: the same kernel specializations)
        r = self.dec_slice or slice(0, q.shape[0])
        s0, s1, s2 = q.stride()
        B, Hq, D = r.stop - r.start, q.shape[1], q.shape[2]
        table, lens, _, qpos = self.groups[0]
        k_layer, v_layer = self.pool.layers[layer]
        kernels.cascade_decode_into(
            q.as_strided((B, 1, Hq, D), (s0, Hq * s1, s1, s2),
                         q.storage_offset() + r.start * s0),      # B entries, 1 query
            _rows4(q, r), k_layer, v_layer,                       # 1 entry, B queries
            (self.dec_table, self.dec_lens, self.dec_qpos), (table, lens, qpos), dest,
            backend=self.backend, **self._paged_kw)

    def _pass_q(self, layer: int, q: torch.Tensor, merged: bool = True):
        """(out, lse) of the pass-Q rows in plan order; with only decode rows and merged=False
        (one rank, no cascade) out stays in q's dtype and lse is not prepared."""
        parts_o, parts_l = {}, {}
        if self.dec:
            qd = (q if self.only_dec else q[self.dec_slice] if self.dec_slice
                  else q.index_select(0, self.dec_rows))[:, None]
            o, lse = self._paged(layer, qd, self.dec_table, self.dec_lens, self.dec_qpos)
            if self.only_dec and not merged and not self.groups:
                return o[:, 0], None
            o, lse = o[:, 0].float(), lse[:, :, 0].contiguous()     # (B, Hq, D), (B, Hq)
            for table, lens, members, qpos in self.groups:          # shared prefix read once
                if members is None:                                  # all rows, in order
                    po, pl = self._paged(layer, qd[:, 0][None], table, lens, qpos,
                                         shared=True)
                    _merge(o, lse, po[0], pl[0].t())
                    continue
                qg = qd.index_select(0, members)[:, 0][None]         # (1, n, Hq, D)
                po, pl = self._paged(layer, qg, table, lens, qpos, shared=True)
                mo, ml = o.index_select(0, members), lse.index_select(0, members)
                _merge(mo, ml, po[0], pl[0].t())
                o.index_copy_(0, members, mo)
                lse.index_copy_(0, members, ml)
            if not self.ext:                                         # rows in plan order
                return o, lse
            for j, i in enumerate(self.dec):
                parts_o[i], parts_l[i] = o[j:j + 1], lse[j:j + 1]
        for i in self.ext:
            r = self.rows[i]
            o, lse = self._paged(layer, q[r][None], self.tables[i], self.ext_lens[i],
                                 self.seq_pos(i)[None])
            parts_o[i], parts_l[i] = o[0].float(), lse[0].t()
        order = self.q_rows
        return (torch.cat([parts_o[i] for i in order]),
                torch.cat([parts_l[i] for i in order]).contiguous())

    def _merge_ranks(self, o: torch.Tensor, lse: torch.Tensor):
        return merge_rows(self.transport, o, lse)

    # ---- ring rows ----

    def _ring_chunk(self, layer: int, i: int, q, k, v, dest):
        """The chunk's attention output for this rank's rows (q (R, Hq, D); k, v (1, R, Hkv,
        D)), written into dest (the step's output rows)."""
        s = self.plan.seqs[i]
        if self.window is None and self._whole_run(layer, i, q, dest):
            return
        if self.world_size == 1:
            o, lse = kernels.attention(q[None], k, v, softmax_scale=self.scale,
                                       causal=True, window_size=self.window,
                                       backend=self.backend, softcap=self.softcap, check=False)
        else:
            o, lse = ring_attention(q[None], k, v, s.chunk_len, self.plan.layout,
                                    self.transport, causal=True, window_size=self.window,
                                    softmax_scale=self.scale, backend=self.backend,
                                    softcap=self.softcap)
        if s.chunk_start == 0:
            dest.copy_(o[0])
            return
        if self.world_size == 1 and self.window is None and s.n_before:
            parts = self._cached_splits(layer, i, q)
            first, second = next(parts), next(parts, None)
            if second is None:
                # the prefix's splits and the chunk's own part merged in one launch, written
                # into the step's output (one launch a layer instead of four)
                # (o, lse) as one extra part of the NE-parts form: no views to drop the 1
                kernels.merge_splits(*first, backend=self.backend, extra=(o, lse),
                                     dest=dest, check=False)
                return
            po, pl = self._merge_parts(itertools.chain((first, second), parts))
        else:
            po, pl = self._prefix(layer, i, q)      # float32 (S, Hq, D), (S, Hq): fresh
        _merge(po, pl, o[0], lse[0].t())            # the chunk's own part, read in place
        dest.copy_(po)

    def _whole_run(self, layer: int, i: int, q, dest) -> bool:
        """The chunk's attention (q (R, Hq, D), world size 1, no window) as one causal launch
        over its prefix and its own tokens, read from the pool as one view (`whole_run`),
        written into dest: where the chunk fills the GPU alone (`split_count` 1) and the view
        stays within int32 element offsets. False where it does not apply."""
        first = self.whole_run.get(i)
        if first is None:
            return False
        s = self.plan.seqs[i]
        R, Hq, _ = q.shape
        flat_k, flat_v = self.pool.slot_views(layer)     # (pages * P, H, Dk) views
        n = s.n_before + R
        if split_count(s.n_before, R, Hq) != 1 or n * flat_k[0].numel() >= 2 ** 31:
            return False
        a = first * self.pool.page_size
        o, _ = kernels.attention(q[None], flat_k[a:a + n][None], flat_v[a:a + n][None],
                                 softmax_scale=self.scale, causal=True, q_offset=s.n_before,
                                 backend=self.backend, softcap=self.softcap, check=False)
        dest.copy_(o[0])
        return True

    def _ring_chunk_expanded(self, layer: int, i: int, q, k, dest, expand):
        """`_ring_chunk` in MLA's expanded form: q (R, Hq, qk_head_dim) expanded queries, k
        (R, 1, latent_dim) this rank's latents of the chunk, expand(latent (n, 1, latent_dim))
        -> per-head K (n, Hq, qk_head_dim) and V (n, Hq, v_head_dim); the output (in the
        values' space) into dest (R, Hq, v_head_dim). No window (DeepSeek-V2 has none)."""
        s = self.plan.seqs[i]
        if self.world_size == 1:
            ke, ve = expand(k)
            o, lse = kernels.attention(q[None], ke[None], ve[None], softmax_scale=self.scale,
                                       causal=True, backend=self.backend,
                                       softcap=self.softcap, check=False)
        else:     # the latent travels; each rank expands the blocks it attends
            o, lse = ring_attention(q[None], k[None], k[None], s.chunk_len, self.plan.layout,
                                    self.transport, causal=True, softmax_scale=self.scale,
                                    backend=self.backend, softcap=self.softcap, expand=expand)
        if s.chunk_start == 0:
            dest.copy_(o[0])
            return
        po, pl = self._prefix(layer, i, q, expand)   # float32 (R, Hq, v_head_dim), (R, Hq)
        _merge(po, pl, o[0], lse[0].t())
        dest.copy_(po)

    def _cached(self, layer: int, i: int, q, q_pos, expand=None):
        """q (R, Hq, D) at global positions q_pos against this rank's tokens of sequence i
        cached before this step -> (out (R, Hq, D) f32, lse (R, Hq) f32).

        Without a window every such token precedes every query of the chunk, so there is no
        mask: the pages are gathered into contiguous K/V and the flash kernel runs with the keys
        split into several batch entries (as flash-decoding does: a short chunk has few query
        blocks, and one long key loop per block would leave most of the GPU idle), the
        splits merged by the log-sum-exp rule. With a window, the paged kernel masks by
        position."""
        s = self.plan.seqs[i]
        n = s.n_before
        R, Hq, D = q.shape
        if n == 0:
            return (torch.zeros(R, Hq, D, dtype=torch.float32, device=q.device),
                    torch.full((R, Hq), float("-inf"), dtype=torch.float32, device=q.device))
        if self.window is not None:
            lens = torch.tensor([n], dtype=torch.int32, device=q.device)
            o, lse = self._paged(layer, q[None], self.tables[i], lens, q_pos[None])
            return o[0].float(), lse[0].t().contiguous()
        return self._merge_parts(self._cached_splits(layer, i, q, expand))

    def _merge_parts(self, parts):
        """(out (NB, R, Hq, D), lse (NB, Hq, R)) partials over disjoint keys, an iterable
        consumed one at a time -> (out (R, Hq, D) f32, lse (R, Hq) f32)."""
        acc_o = acc_l = None
        for o, lse in parts:
            po, pl = kernels.merge_splits(o, lse, backend=self.backend)
            if acc_o is None:
                acc_o, acc_l = po, pl
            else:
                _merge(acc_o, acc_l, po, pl)
        return acc_o, acc_l

    def _cached_splits(self, layer: int, i: int, q, expand=None):
        """The flash partials of q against sequence i's n_before (> 0) cached tokens, no
        window: (out (NB, R, Hq, D), lse (NB, Hq, R)), each the NB splits of one piece, yielded
        one at a time (a long fragmented prefix has many pieces: merged as they come, their
        outputs are never all held at once). expand: MLA's expanded form (`mla`), each piece's
        latents expanded to per-head K and V (pieces of at most MLA_PIECE_TOKENS)."""
        n = self.plan.seqs[i].n_before
        R, Hq, D = q.shape
        P = self.pool.page_size
        H, Dk = self.pool.k.shape[-2:]
        runs = self.prefix_run.get(i)
        # a view needs no buffer: pieces only keep element offsets within int32 (one kernel
        # variant); a gather is bounded to PIECE_TOKENS a piece
        cap = PIECE_TOKENS if expand is None else MLA_PIECE_TOKENS
        if runs is not None:
            view_cap = max(P, (2 ** 31 - 1) // (H * Dk) // P * P)
            pieces = view_pieces(runs, n, P, view_cap if expand is None else
                                 max(P, min(view_cap, cap // P * P)))
        else:
            pieces = [(a, min(n, a + cap), None) for a in range(0, n, cap)]
        flat_k, flat_v = self.pool.slot_views(layer)     # (pages * P, H, Dk) views
        same = self.pool.v is self.pool.k                # MLA: the values are the keys (latent)
        row = H * Dk
        for a, b, first in pieces:
            splits = split_count(b - a, R, Hq)
            L = (b - a) // splits
            if first is not None:   # tokens a..b sit in pages first, first + 1, ...
                # the splits' (splits, L, H, Dk) views in one op each (a slice and a view
                # before: view ops add up in a launch-bound step)
                base = flat_k.storage_offset() + first * P * row
                k = flat_k.as_strided((splits, L, H, Dk), (L * row, row, Dk, 1), base)
                v = k if same else flat_v.as_strided((splits, L, H, Dk), (L * row, row, Dk, 1),
                                                     flat_v.storage_offset() + first * P * row)
                parts = [(k, v, splits)]
                if splits * L < b - a:
                    kt = flat_k[first * P + splits * L:first * P + b - a]
                    vt = kt if same else flat_v[first * P + splits * L:first * P + b - a]
                    parts.append((kt[None], vt[None], 1))
            else:
                pages = self.tables[i][0, a // P: -(-b // P)].long()
                k = self.pool.k[layer].index_select(0, pages).reshape(-1, H, Dk)[:b - a]
                v = (k if same
                     else self.pool.v[layer].index_select(0, pages).reshape(-1, H, Dk)[:b - a])
                parts = [(k[:splits * L].view(splits, L, H, Dk),
                          v[:splits * L].view(splits, L, H, Dk), splits)]
                if splits * L < b - a:
                    parts.append((k[splits * L:][None], v[splits * L:][None], 1))
            for kk, vv, nb in parts:
                if expand is not None:     # latents (nb, L, 1, Dk) -> per-head K, V
                    nl = kk.shape[1]
                    kk, vv = expand(kk.reshape(nb * nl, H, Dk))
                    kk, vv = kk.view(nb, nl, *kk.shape[1:]), vv.view(nb, nl, *vv.shape[1:])
                # each piece's splits are merged in one launch by the caller (a merge and two
                # copies per split made a short chunk's step launch-bound on the GPU); q the
                # same for every split: a stride-0 view, one op
                qq = q.as_strided((nb, R, Hq, D), (0, *q.stride()), q.storage_offset())
                yield kernels.attention(qq, kk, vv,
                                        softmax_scale=self.scale, causal=False,
                                        backend=self.backend, softcap=self.softcap,
                                        check=False)

    def _prefix(self, layer: int, i: int, q, expand=None):
        """The chunk's queries (this rank's rows) against the sequence's earlier tokens on
        every rank: pass-Q within the ring step (expand: MLA's expanded form)."""
        s = self.plan.seqs[i]
        dev = q.device
        if self.world_size == 1:
            return self._cached(layer, i, q, self.seq_pos(i), expand)
        N = self.world_size
        width = -(-s.chunk_len // N)                      # the longest shard of the chunk
        S = q.shape[0]
        qp = torch.zeros(width, *q.shape[1:], dtype=q.dtype, device=dev)
        qp[:S] = q
        pp = torch.full((width,), -1, dtype=torch.int64, device=dev)   # -1: sees no key
        pp[:S] = self.seq_pos(i)
        got = self.transport.all_gather(torch.cat([qp.reshape(-1).float(), pp.float()]),
                                        blocking=False)
        nq = qp.numel()
        qa = torch.cat([g[:nq].view(qp.shape) for g in got]).to(q.dtype)   # (N*width, Hq, D)
        pa = torch.cat([g[nq:] for g in got]).to(torch.int64)
        o, lse = self._cached(layer, i, qa, pa, expand)                  # (N*w, Hq, D), (N*w, Hq)
        parts = self.transport.all_gather(torch.cat([o.reshape(-1), lse.reshape(-1)]),
                                          blocking=False)
        n = o.numel()
        me = slice(self.rank * width, self.rank * width + S)
        acc_o = acc_l = None
        for p in parts:
            po = p[:n].view(o.shape)[me]
            pl = p[n:].view(lse.shape)[me]
            if acc_o is None:
                acc_o, acc_l = po.clone(), pl.clone()
            else:
                _merge(acc_o, acc_l, po, pl)
        return acc_o, acc_l
