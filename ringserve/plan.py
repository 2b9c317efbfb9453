"""The step plan: what one engine step asks of each rank (built by `ringserve.scheduler`).

A step is one flat token batch per rank. Every running sequence that has work in the step
contributes one `SeqStep` to every rank's plan, in the same order on all ranks (the collectives
of the step then match across ranks without talking):

- kind "q" (pass-Q: decode tokens, short prompt extensions): every rank runs all the chunk's
  tokens; each token's K/V are stored by one owner rank; every rank attends the chunk's queries
  to its own cache and the partial (out, lse) are merged across ranks.
- kind "ring": the chunk is sharded over the ranks by the layout (striped or ring); attention is
  ring attention within the chunk, plus pass-Q against the sequence's tokens already cached
  (the prompt's earlier chunks), merged by the log-sum-exp rule.

The driver owns the pages: a step carries the slots to write and what changed in each sequence's
page table (the workers keep a copy of the tables of running sequences, so a step costs what
changed, not the length of every document). A rebuilt group starts with no tables; the driver's
copies are then all unsent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .sampling import SamplingParams

# a decode row's input id when the token was sampled by a step still in flight (the engine's
# async scheduling plans a step before the one before it has answered): the worker puts in the
# token it sampled last for that sequence
PENDING_TOKEN = -1


@dataclass
class SeqStep:
    """One sequence's work on one rank. The per-token fields (token_ids, positions,
    write_rows, slots) are lists, or for a ring chunk int64 numpy arrays (the scheduler's:
    a long chunk's fields are built and read without Python per token)."""
    kind: str                       # "q" | "ring"
    token_ids: List[int]            # the tokens this rank runs (q: whole chunk; ring: its shard)
    positions: List[int]            # their global positions
    write_rows: List[int]           # rows of token_ids whose K/V this rank stores ...
    slots: List[int]                # ... in these flat slots of its pool
    seq: int                        # the sequence's page-table key on the workers
    pages_from: int                 # this rank's table from this index on is ...
    pages_new: List[int]            # ... these pages (the rest it already has)
    n_before: int                   # this rank's cached tokens of the sequence before the step
    n_after: int                    # ... and after it
    chunk_len: int = 0              # ring: the chunk's length over all ranks
    chunk_start: int = 0            # ring: global position of the chunk's first token
    sample: Optional[Tuple[SamplingParams, int]] = None  # (params, step): sample after last row
    targets: Optional[List[int]] = None   # score: next-token id of each row (-1: none)
    group: int = -1                 # cascade group of a one-token q step (-1: none)
    # the sequence length that picks longrope's factors for these rows: the length the
    # request's known tokens reach (0: each row's own position + 1)
    seq_len: int = 0

    def __post_init__(self):
        if self.kind not in ("q", "ring"):
            raise ValueError(f"kind must be 'q' or 'ring', got {self.kind!r}")
        if len(self.positions) != len(self.token_ids) or len(self.write_rows) != len(self.slots):
            raise ValueError("positions/token_ids and write_rows/slots must have equal lengths")


@dataclass
class RankPlan:
    layout: str
    seqs: List[SeqStep] = field(default_factory=list)
    copy_src: List[int] = field(default_factory=list)   # copy-on-write before the step
    copy_dst: List[int] = field(default_factory=list)
    # cascade groups: (a member's table key, k): the first k pages of every member's table are
    # the same pages, read once for the whole group
    groups: List[Tuple[int, int]] = field(default_factory=list)
    drop: List[int] = field(default_factory=list)       # tables of freed sequences
    # a step of one-token rows only: the graph bucket (batch, table width), the same on every
    # rank; 0 when the step is not graph-shaped
    graph_batch: int = 0
    graph_width: int = 0
    # a graph step whose rows all share one cached document (every rank one cascade group of
    # every row): the width bucket of that shared prefix's table, read once for all rows in
    # the graph; graph_width then bounds each row's own pages after it. 0: no shared prefix
    graph_prefix: int = 0
    # async scheduling: the workers keep each sequence's last sampled token and put it in for
    # PENDING_TOKEN inputs; with more than one rank they share the step's sampled tokens after
    # sampling (a sum over ranks of each row's token + 1 from the rank that sampled it). Off:
    # the synchronous engine's steps do none of this
    track_tokens: bool = False
    # a decode graph bucket (batch, width, prefix) for the worker to capture after this step's
    # work, when it has none: the first decode bucket of a lone long prompt, marked on its
    # first chunk, so that the capture (tens of ms) falls inside the prefill instead of
    # stalling the request's first decode token. Empty: none
    capture_ahead: Tuple[int, ...] = ()


def step_signature(plan: RankPlan) -> Optional[Tuple[int, int, int]]:
    """(first sequence's table key, its first row's position, rows) of a rank's plan: the same
    on the driver and the worker, different for every step of a sequence (benchmarks pair the
    engine's step log with the workers' call stamps by it). None for a plan without rows."""
    if not plan.seqs:
        return None
    s = plan.seqs[0]
    return (int(s.seq), int(s.positions[0]) if len(s.positions) else -1,
            sum(len(x.token_ids) for x in plan.seqs))


__all__ = ["SeqStep", "RankPlan", "PENDING_TOKEN", "step_signature"]
