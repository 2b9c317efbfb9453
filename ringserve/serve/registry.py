"""The shared document index of an application with several replicas.

Each replica owns its own actor group, so a document's KV lives in the replica that prefilled it,
while Serve may route a question to any replica. With num_replicas > 1 the application gets this
small deployment (one replica, no CPU): it keeps every document's card and token ids, so

- GET / list / DELETE see every document whichever replica answers;
- a question that lands on a replica that has not seen the document is answered there from the
  token ids (the first such question prefills it; the engine then keeps that KV in its unpinned
  prefix cache, so later questions on that replica reuse it and memory pressure can evict it);
- a replica notices deletions made elsewhere (on its next request) and unpins its copy.

With one replica (the default) none of this exists: the replica's own index is the whole truth.
Serve ties this deployment's life to the application's; a restart of it forgets the documents.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ray import serve


@serve.deployment(name="RingServeDocuments", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=256)
class DocumentRegistry:
    def __init__(self):
        self._docs: Dict[str, Tuple[dict, bytes]] = {}

    async def put(self, doc_id: str, card: dict, token_ids: bytes) -> None:
        """token_ids: little-endian int32 bytes."""
        self._docs[doc_id] = (dict(card), bytes(token_ids))

    async def update(self, doc_id: str, card: dict) -> None:
        """A new card (status) for a document that still exists; a deleted one stays deleted,
        and a finished one never goes back to "prefilling": a progress report sent just before
        the prefill ended may arrive after the final card (two calls, no ordering between them)."""
        entry = self._docs.get(doc_id)
        if entry is None:
            return
        if card.get("status") == "prefilling" and entry[0].get("status") not in (
                None, "prefilling"):
            return
        self._docs[doc_id] = (dict(card), entry[1])

    async def get(self, doc_id: str) -> Optional[Tuple[dict, bytes]]:
        return self._docs.get(doc_id)

    async def card(self, doc_id: str) -> Optional[dict]:
        entry = self._docs.get(doc_id)
        return None if entry is None else entry[0]

    async def alive(self, doc_ids: List[str]) -> List[str]:
        return [d for d in doc_ids if d in self._docs]

    async def delete(self, doc_id: str) -> Optional[dict]:
        entry = self._docs.pop(doc_id, None)
        return None if entry is None else entry[0]

    async def listing(self) -> List[dict]:
        return [card for card, _ in self._docs.values()]


__all__ = ["DocumentRegistry"]
