"""dsgd bench's rows: the numbers come from the case that ran (dsgd.bench.run_case, in-process)."""
from __future__ import annotations

import json

from dsgd.bench import run_case


def test_state_bytes_are_what_the_slots_hold(tmp_path):
    wl = tmp_path / "one.json"
    wl.write_text(json.dumps([{"name": "w", "shape": [64, 32], "dtype": "float32"}]))
    rows = {impl: run_case(dict(workload=str(wl), mesh="batch=8", layout="replicated", implementation=impl, steps=2))
            for impl in ("auto", "sharded_state")}
    for impl, r in rows.items():
        assert r["status"] == "ok" and r["impl_used"] in (("grouped", "per_shard") if impl == "auto" else (impl,)), r
        assert r["median_ms"] > 0 and r["p10_ms"] <= r["p90_ms"] and 0 < r["roofline_frac"]
    momentum = 64 * 32 * 4  # one replicated float32 slot on each device
    assert rows["auto"]["state_bytes_per_device"] == momentum
    assert rows["sharded_state"]["state_bytes_per_device"] == momentum // 8  # ZeRO-1 over batch=8
