"""The batch job's CPU test (tests/test_batch.py) on a GPU host, by hand: see batch_gpu_smoke.sh.

    python3 tests/batch_gpu_check.py prepare WORK            # inputs into WORK/docs.jsonl
    python3 tests/batch_gpu_check.py check WORK MODEL N      # WORK/results.jsonl vs LLM (N GPUs)
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_cases import MAX_KV, check_against_llm, make_inputs  # noqa: E402


def main(argv):
    cmd, work = argv[0], Path(argv[1])
    if cmd == "prepare":
        work.mkdir(parents=True, exist_ok=True)
        good, errors = make_inputs(work, random.Random(20261128))
        (work / "cases.json").write_text(json.dumps({"good": good, "errors": errors}))
        return 0
    model, world_size = argv[2], int(argv[3])
    cases = json.loads((work / "cases.json").read_text())
    results = [json.loads(x) for x in (work / "results.jsonl").read_text().splitlines()]
    ids = sorted(json.dumps(r["id"]) for r in results)
    want = sorted([json.dumps(g["id"]) for g in cases["good"]]
                  + [json.dumps(k) for k in cases["errors"]])
    assert ids == want, (ids, want)
    by_id = {json.dumps(r["id"]): r for r in results}
    for rid, etype in cases["errors"].items():
        assert by_id[json.dumps(rid)]["error"]["type"] == etype, by_id[json.dumps(rid)]
    from ringserve.llm import LLM

    llm = LLM(model, world_size=world_size, layout="striped", device="cuda",
              max_kv_tokens=MAX_KV, ray_address="auto")
    try:
        # bf16 on the GPU: two runs of the same requests differ by bf16 rounding of logits of
        # size ~10 (2^-8 relative: ~0.04); seen: 0.023 on H200
        check_against_llm(llm, by_id, cases["good"], work, atol=6e-2, rtol=6e-2)
    finally:
        llm.shutdown()
    print(f"GPU BATCH CHECK OK: {len(results)} records, {len(cases['good'])} compared with LLM")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
