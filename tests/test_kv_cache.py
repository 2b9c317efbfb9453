"""Paged KV cache: allocation, positions, fork without copies, copy-on-write, trim, free; and
paged_decode over the cache equals attention over the same tokens gathered contiguously."""
import pytest
import torch

from ringserve.kernels import paged_decode
from ringserve.kernels.reference import attention_ref
from ringserve.kv_cache import KVCacheConfig, KVCacheFullError, PagedKVCache, pages_for_budget
from ringserve.doc_cache import CachedSeq, DocumentCache, common_prefix, doc_key


def make(num_pages=12, page=4, L=2, H=2, D=8):
    return PagedKVCache(KVCacheConfig(num_layers=L, num_kv_heads=H, head_dim=D,
                                      num_pages=num_pages, page_size=page))


def fill(cache, sid, positions, gen):
    slots = cache.append_slots(sid, torch.as_tensor(positions))
    n = len(positions)
    kv = []
    for layer in range(cache.cfg.num_layers):
        k = torch.randn(n, cache.cfg.num_kv_heads, cache.cfg.head_dim, generator=gen)
        v = torch.randn(n, cache.cfg.num_kv_heads, cache.cfg.head_dim, generator=gen)
        cache.write(layer, slots, k, v)
        kv.append((k, v))
    return kv


def test_config_checks_show_numbers():
    with pytest.raises(ValueError, match=r"num_pages \(0\)"):
        KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_pages=0)
    with pytest.raises(ValueError, match=r"page_size \(0\)"):
        KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_pages=1, page_size=0)
    cfg = KVCacheConfig(num_layers=3, num_kv_heads=2, head_dim=8, num_pages=1)
    assert cfg.bytes_per_token == 2 * 3 * 2 * 8 * 4 + 4
    assert pages_for_budget(10 * 16 * cfg.bytes_per_token + 5, 16, cfg.bytes_per_token) == 10


def test_append_gather_positions_and_free():
    g = torch.Generator().manual_seed(1)
    c = make()
    kv1 = fill(c, "a", list(range(0, 21, 2)), g)       # 11 tokens: 3 pages of 4
    kv2 = fill(c, "a", [30, 31, 32], g)                 # crosses into a 4th page
    assert c.seq_len("a") == 14 and c.num_free_pages == 12 - 4
    assert c.positions("a").tolist() == list(range(0, 21, 2)) + [30, 31, 32]
    for layer in range(2):
        k, v = c.gather(layer, "a")
        assert torch.equal(k, torch.cat([kv1[layer][0], kv2[layer][0]]))
        assert torch.equal(v, torch.cat([kv1[layer][1], kv2[layer][1]]))
    assert c.block_table("a").shape == (1, 4)
    c.free("a")
    assert c.num_free_pages == 12 and not c.has("a")


def test_full_cache_raises_before_changing_anything():
    c = make(num_pages=2, page=4)
    fill(c, "a", list(range(6)), torch.Generator().manual_seed(0))
    with pytest.raises(KVCacheFullError, match="needs 2 more KV pages for 7 tokens"):
        c.append_slots("a", torch.arange(6, 9 + 4))
    assert c.seq_len("a") == 6 and c.num_free_pages == 0


def test_fork_shares_pages_and_copy_on_write_keeps_parent_intact():
    g = torch.Generator().manual_seed(2)
    c = make(num_pages=10, page=4)
    fill(c, "doc", list(range(10)), g)                  # pages: 4 + 4 + 2 (partial)
    k_doc, v_doc = c.gather(0, "doc")
    free0 = c.num_free_pages
    assert c.fork("doc", "req", max_position=7) == 7    # first 7 tokens, 2 pages shared
    assert c.num_free_pages == free0                    # no page copied by the fork
    assert c.pages_needed("req", 1) == 1                # writing into shared page 2 copies it
    assert c.pages_needed("req", 2) == 2                # ... and a 9th token opens page 3
    new = fill(c, "req", [7, 8], g)
    assert c.num_free_pages == free0 - 2
    k_req, _ = c.gather(0, "req")
    assert torch.equal(k_req[:7], k_doc[:7]) and torch.equal(k_req[7:], new[0][0])
    assert torch.equal(c.gather(0, "doc")[0], k_doc)    # the parent never sees req's tokens
    assert c.positions("doc").tolist() == list(range(10))
    c.free("doc")
    assert torch.equal(c.gather(0, "req")[0][:7], k_doc[:7])  # shared pages outlive the parent
    c.free("req")
    assert c.num_free_pages == 10


def test_trim_then_append_in_a_shared_page():
    g = torch.Generator().manual_seed(3)
    c = make(num_pages=8, page=4)
    fill(c, "a", [0, 2, 4, 6, 8, 10], g)
    c.fork("a", "b")
    assert c.trim("a", max_position=5) == 3             # keeps positions 0, 2, 4
    fill(c, "a", [20], g)                               # page 0 is shared with b: copied
    assert c.positions("b").tolist() == [0, 2, 4, 6, 8, 10]
    assert c.positions("a").tolist() == [0, 2, 4, 20]


def test_paged_decode_over_cache_matches_reference():
    g = torch.Generator().manual_seed(4)
    c = make(num_pages=16, page=4, L=1, H=2, D=8)
    pos = list(range(1, 40, 3))                         # a striped shard: stride 3
    kv = fill(c, "s", pos, g)
    q = torch.randn(1, 3, 4, 8, generator=g)            # 3 new queries, GQA 4/2
    q_pos = torch.tensor([[41, 42, 43]])
    out, lse = paged_decode(q, c.k[0], c.v[0], c.block_table("s"), c.seq_lens("s"),
                            causal=True, window_size=20, q_pos=q_pos, kv_pos=c.kv_pos)
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


def test_block_table_rebuilt_only_when_pages_change_and_scratch_page():
    g = torch.Generator().manual_seed(5)
    c = make(num_pages=6, page=4)
    fill(c, "a", [0, 1], g)
    t1 = c.block_table("a")
    fill(c, "a", [2], g)                      # same page: the device table is reused
    assert c.block_table("a") is t1
    fill(c, "a", [3, 4], g)                   # a new page: rebuilt, and correct
    t2 = c.block_table("a")
    assert t2 is not t1 and t2[0].tolist() == c._seqs["a"].pages and len(c._seqs["a"].pages) == 2
    c.fork("a", "b")
    fill(c, "b", [5], g)                      # copy-on-write of the shared last page
    assert c.block_table("b")[0].tolist() == c._seqs["b"].pages != c._seqs["a"].pages
    assert c.block_table("a")[0].tolist() == c._seqs["a"].pages
    # the scratch page (CUDA-graph decode): set aside once, outside every sequence
    free, cap = c.num_free_pages, c.capacity_tokens
    slot = c.reserve_scratch_page()
    assert c.reserve_scratch_page() == slot and slot % 4 == 0
    assert c.num_free_pages == free - 1 and c.capacity_tokens == cap - 4
    assert slot // 4 not in c._seqs["a"].pages + c._seqs["b"].pages
    c.clear()
    assert c.num_free_pages == 5              # still set aside after clear()
