"""Paged KV: the driver's page bookkeeping (KVManager: allocation, fork without copies,
copy-on-write, page-table deltas, free) with the worker's tensors (KVPool); paged_decode over the
pool equals attention over the same tokens gathered contiguously; the document cache index."""
import pytest
import torch

from ringserve.kernels import paged_decode
from ringserve.kernels.reference import attention_ref
from ringserve.kv_cache import KVCacheConfig, KVCacheFullError, KVPool, pages_for_budget
from ringserve.kv_manager import KVManager, balanced_counts
from ringserve.doc_cache import CachedSeq, DocumentCache, common_prefix, doc_key


class Rank0:
    """One rank's KV: the driver's page bookkeeping (KVManager) and the worker's tensors
    (KVPool), used as the engine uses them."""

    def __init__(self, num_pages=12, page=4, L=2, H=2, D=8):
        self.kv = KVManager([num_pages], page)
        self.pool = KVPool(KVCacheConfig(num_layers=L, num_kv_heads=H, head_dim=D,
                                         num_pages=num_pages, page_size=page))

    def fill(self, seq, n, gen, positions=None):
        """Append n tokens (K/V random), as a step does; returns [(k, v)] per layer."""
        start = len(seq)
        slots, copies = self.kv.append(seq, [1] * n, [0] * n)
        if copies[0]:
            src, dst = zip(*copies[0])
            self.pool.copy_pages(list(src), list(dst))
        slots = torch.tensor(slots[0], dtype=torch.int64)
        pos = torch.arange(start, start + n) if positions is None else torch.tensor(positions)
        self.pool.set_positions(slots, pos)
        out = []
        cfg = self.pool.cfg
        for layer in range(cfg.num_layers):
            k = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen)
            v = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen)
            self.pool.write(layer, slots, k, v)
            out.append((k, v))
        return out

    def gather(self, layer, seq):
        pages = torch.tensor(seq.pages[0], dtype=torch.int64)
        H, D = self.pool.cfg.num_kv_heads, self.pool.cfg.head_dim
        n = seq.counts[0]
        return (self.pool.k[layer, pages].reshape(-1, H, D)[:n],
                self.pool.v[layer, pages].reshape(-1, H, D)[:n])

    def positions(self, seq):
        pages = torch.tensor(seq.pages[0], dtype=torch.int64)
        return self.pool.kv_pos[pages].reshape(-1)[:seq.counts[0]].tolist()


def test_config_checks_show_numbers():
    with pytest.raises(ValueError, match=r"num_pages \(0\)"):
        KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_pages=0)
    with pytest.raises(ValueError, match=r"page_size \(0\)"):
        KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_pages=1, page_size=0)
    cfg = KVCacheConfig(num_layers=3, num_kv_heads=2, head_dim=8, num_pages=1)
    assert cfg.bytes_per_token == 2 * 3 * 2 * 8 * 4 + 4
    assert pages_for_budget(10 * 16 * cfg.bytes_per_token + 5, 16, cfg.bytes_per_token) == 10


def test_append_positions_and_free():
    g = torch.Generator().manual_seed(1)
    r = Rank0()
    s = r.kv.new()
    kv1 = r.fill(s, 11, g, positions=list(range(0, 21, 2)))   # 3 pages of 4
    kv2 = r.fill(s, 3, g, positions=[30, 31, 32])              # crosses into a 4th page
    assert len(s) == 14 and r.kv.free_pages() == [12 - 4] and len(s.pages[0]) == 4
    assert r.positions(s) == list(range(0, 21, 2)) + [30, 31, 32]
    for layer in range(2):
        k, v = r.gather(layer, s)
        assert torch.equal(k, torch.cat([kv1[layer][0], kv2[layer][0]]))
        assert torch.equal(v, torch.cat([kv1[layer][1], kv2[layer][1]]))
    s.table_delta(0)                                    # a step sent its table to the worker
    r.kv.free(s)
    assert r.kv.free_pages() == [12] and r.kv.take_dropped() == [1 * s.key]
    never_sent = r.kv.new()
    r.fill(never_sent, 2, g)
    r.kv.free(never_sent)
    assert r.kv.take_dropped() == []                    # no worker holds its table


def test_prompt_pages_from_the_low_end_one_token_rows_from_the_high_end():
    """Prompt chunks (append) take the lowest free pages, one-token rows (append(high=True))
    the highest: a prompt that grows while another sequence decodes keeps one ascending run;
    freed pages go back in order, small frees and large ones alike."""
    m = KVManager([40], page_size=4, reserved=1)
    doc, dec = m.new(), m.new()
    m.append(dec, [1, 2, 3], [0, 0, 0], high=True)
    for step in range(8):                       # 3 prompt tokens and 1 decode token a step
        m.append(doc, [5, 6, 7], [0, 0, 0])
        m.append(dec, [9], [0], high=True)
    assert doc.pages[0] == list(range(1, 7))    # 24 tokens: pages 1..6, one run
    assert dec.pages[0] == [39, 38, 37]         # 11 tokens from the top
    free = m.ranks[0].free
    m.free(dec)
    assert free == sorted(free, reverse=True) and free[0] == 39
    m.free(doc)
    assert m.ranks[0].free == list(range(39, 0, -1))


def test_full_cache_raises_before_changing_anything():
    r = Rank0(num_pages=2, page=4)
    s = r.kv.new()
    r.fill(s, 6, torch.Generator().manual_seed(0))
    with pytest.raises(KVCacheFullError, match=r"\[2\] pages needed, \[0\] free"):
        r.kv.append(s, [1] * 7, [0] * 7)
    assert len(s) == 6 and r.kv.free_pages() == [0] and s.counts == [6]


def test_fork_shares_pages_and_copy_on_write_keeps_parent_intact():
    g = torch.Generator().manual_seed(2)
    r = Rank0(num_pages=10, page=4)
    doc = r.kv.new()
    r.fill(doc, 10, g)                                  # pages: 4 + 4 + 2 (partial)
    k_doc, _ = r.gather(0, doc)
    free0 = r.kv.free_pages()
    req = r.kv.fork(doc, 7)                             # first 7 tokens, 2 pages shared
    assert req.counts == [7] and req.pages[0] == doc.pages[0][:2]
    assert r.kv.free_pages() == free0                   # no page copied by the fork
    assert r.kv.need(req, [1]) == [1]                   # writing into shared page 1 copies it
    assert r.kv.need(req, [2]) == [2]                   # ... and a 9th token opens page 2
    new = r.fill(req, 2, g)
    assert r.kv.free_pages() == [free0[0] - 2] and req.pages[0][0] == doc.pages[0][0]
    k_req, _ = r.gather(0, req)
    assert torch.equal(k_req[:7], k_doc[:7]) and torch.equal(k_req[7:], new[0][0])
    assert torch.equal(r.gather(0, doc)[0], k_doc)     # the parent never sees req's tokens
    assert r.positions(doc) == list(range(10))
    r.kv.free(doc)
    assert torch.equal(r.gather(0, req)[0][:7], k_doc[:7])   # shared pages outlive the parent
    r.kv.free(req)
    assert r.kv.free_pages() == [10]


def test_page_table_deltas_after_append_and_copy_on_write():
    """A worker's copy of a page table gets only what changed: appended pages, and from the
    copied page on after a copy-on-write."""
    g = torch.Generator().manual_seed(5)
    r = Rank0(num_pages=8, page=4)
    a = r.kv.new()
    r.fill(a, 6, g)
    assert a.table_delta(0) == (0, a.pages[0])          # first time: the whole table
    r.fill(a, 1, g)                                     # same page: nothing to send
    assert a.table_delta(0) == (2, [])
    r.fill(a, 2, g)                                     # a new page
    assert a.table_delta(0) == (2, a.pages[0][2:]) and len(a.pages[0]) == 3
    b = r.kv.fork(a, 9)
    assert b.table_delta(0) == (0, a.pages[0])
    r.fill(b, 1, g)                                     # copy-on-write of the shared page 2
    first, new = b.table_delta(0)
    assert first == 2 and new == b.pages[0][2:] and b.pages[0][2] != a.pages[0][2]


def test_owners_spread_over_ranks_and_reserved_pages():
    kv = KVManager([6, 6, 6], 4, reserved=1)            # page 0 of each rank set aside
    assert kv.capacity_tokens == 3 * 5 * 4 and kv.free_pages() == [5, 5, 5]
    s = kv.new()
    slots, copies = kv.append(s, list(range(9)), [0, 1, 2, 0, 1, 2, 0, 1, 2])
    assert s.counts == [3, 3, 3] and all(not c for c in copies)
    assert all(0 not in p for p in s.pages) and all(sl // 4 != 0 for r in slots for sl in r)
    assert kv.pages_of([s]) == [1, 1, 1]
    t = kv.fork(s, 5)                                   # owners 0,1,2,0,1 -> counts 2,2,1
    assert t.counts == [2, 2, 1] and kv.pages_of([s, t]) == [1, 1, 1]   # shared: once
    assert balanced_counts([2, 2, 1], 4) == [3, 3, 3]


def test_paged_decode_over_the_pool_matches_reference():
    g = torch.Generator().manual_seed(4)
    r = Rank0(num_pages=16, page=4, L=1, H=2, D=8)
    s = r.kv.new()
    pos = list(range(1, 40, 3))                         # a striped shard: stride 3
    kv = r.fill(s, len(pos), g, positions=pos)
    q = torch.randn(1, 3, 4, 8, generator=g)            # 3 new queries, GQA 4/2
    q_pos = torch.tensor([[41, 42, 43]])
    table = torch.tensor([s.pages[0]], dtype=torch.int32)
    out, lse = paged_decode(q, r.pool.k[0], r.pool.v[0], table,
                            torch.tensor([len(s)], dtype=torch.int32),
                            causal=True, window_size=20, q_pos=q_pos, kv_pos=r.pool.kv_pos)
    ro, rl = attention_ref(q, kv[0][0][None], kv[0][1][None], causal=True, window_size=20,
                           q_pos=q_pos[0], k_pos=torch.tensor(pos))
    torch.testing.assert_close(out.double(), ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, rl, rtol=1e-5, atol=1e-5)


def test_document_cache_match_budget_and_eviction_order():
    t = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    dc = DocumentCache(budget_tokens=10)
    a = CachedSeq(doc_key(t([1, 2, 3, 4])), "sa", t([1, 2, 3, 4]), torch.zeros(4, dtype=torch.int8))
    b = CachedSeq(doc_key(t([1, 2, 9])), "sb", t([1, 2, 9]), torch.zeros(3, dtype=torch.int8),
                  pinned=True)
    assert dc.add(a) == [] and dc.add(b) == []
    e, n = dc.match(t([1, 2, 3, 4, 5]))
    assert e is a and n == 4
    e, n = dc.match(t([1, 2, 9, 9]))
    assert e is b and n == 3
    assert dc.match(t([7]))[1] == 0
    assert common_prefix(t([1, 2]), t([1, 2, 3])) == 2
    # a longer unpinned sequence extending `a` replaces it
    a2 = CachedSeq(doc_key(t([1, 2, 3, 4, 5, 6])), "sa2", t([1, 2, 3, 4, 5, 6]),
                   torch.zeros(6, dtype=torch.int8))
    assert dc.add(a2) == [a]
    assert dc.total_tokens == 9 and dc.pinned_tokens == 3
    c = CachedSeq("k3", "sc", t([5, 5]), torch.zeros(2, dtype=torch.int8))
    dc.add(c)                                           # 11 > 10: evict LRU unpinned first
    assert [x.kv for x in dc.over_budget()] == ["sa2"]
    assert [x.kv for x in dc.eviction_order()] == ["sa2", "sc", "sb"]


def test_a_prompt_continues_its_run_past_a_freed_hole():
    """A prompt's next page is the one after its last when that is free, not the lowest free
    page: a short request that took the pages after it and finished leaves a hole below the
    prompt's end, which the prompt does not jump back into (its prefix stays few runs)."""
    from ringserve.kv_manager import KVManager
    m = KVManager([32], page_size=4)
    a = m.new()
    m.append(a, list(range(8)), [0] * 8)          # pages 0, 1
    b = m.new()
    m.append(b, [1, 2, 3], [0] * 3)               # page 2, right after a's
    m.append(a, list(range(8)), [0] * 8)          # pages 3, 4
    m.free(b)                                     # page 2 free again: a hole below a's end
    m.append(a, list(range(8)), [0] * 8)          # 5, 6: a continues, no jump into the hole
    assert a.pages[0] == [0, 1, 3, 4, 5, 6]
    c = m.new()
    m.append(c, [1], [0])                         # a new prompt takes the lowest: the hole
    assert c.pages[0] == [2]


def test_array_append_equals_list_append():
    """A ring chunk's owners and tokens as int arrays (the scheduler's, no Python per token)
    give the same slots, pages, counts, tokens and copy-on-write as the list path."""
    import numpy as np

    from ringserve.kv_manager import owner_counts
    from ringserve.scheduler import ring_owners
    from ringserve.parallel import layout as layouts

    for layout in ("striped", "ring"):
        for N in (1, 2, 3):
            for n in (N, 7, 64, 131):
                old = [0] * n
                for s in layouts.shards(n, N, layout):
                    for p in s.positions().tolist():
                        old[p] = s.rank
                arr = ring_owners(n, N, layout)
                assert arr.tolist() == old
                assert owner_counts(arr, N) == owner_counts(old, N) == [old.count(r)
                                                                       for r in range(N)]
    runs = {}
    for kind in ("list", "array"):
        m = KVManager([64, 64, 64], page_size=4, reserved=1)
        doc = m.new()
        m.append(doc, list(range(10)), [r % 3 for r in range(10)])
        q = m.fork(doc, 7)                  # partly filled last pages: copy-on-write next
        toks, own = list(range(100, 150)), ring_owners(50, 3, "striped").tolist()
        if kind == "array":
            slots, copies = m.append(q, np.array(toks), np.array(own))
            assert all(isinstance(s, np.ndarray) and s.dtype == np.int64 for s in slots)
            slots = [s.tolist() for s in slots]
        else:
            slots, copies = m.append(q, toks, own)
        runs[kind] = (slots, copies, q.pages, q.counts, q.tokens, q.owners, doc.pages)
        assert all(type(t) is int for t in q.tokens + q.owners)
    assert runs["list"] == runs["array"]
