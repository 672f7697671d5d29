"""The benchmark suite runs end to end (``--quick``) and writes parseable results; timings are not asserted."""

import json

from personafuse import bench


def test_quick_bench_writes_all_sections(tmp_path, capsys):
    bench.main(["--out", str(tmp_path), "--quick"])

    results = json.loads((tmp_path / "results.json").read_text())
    assert {"torch", "cpu_count", "date"} <= results["machine"].keys()
    assert results["quick"] is True

    delta = results["delta"]
    assert len(delta) == len(bench.QUICK.delta_shapes) * 4
    assert {r["gates"] for r in delta} == {"sequence, dense", "sequence, top-2", "token, dense", "token, top-2"}
    assert all(r["ratio"] > 0 and r["stacked"]["median_ms"] > 0 and r["auto"]["median_ms"] > 0 for r in delta)
    assert {r["gates"] for r in delta if r["auto_path"] == "sparse"} == {"sequence, top-2"}

    train = {r["case"]: r for r in results["train_step"]}
    assert train.keys() == bench.TRAIN_CASES.keys()
    for case in ("personafuse", "personafuse_top2", "personafuse_loop", "personafuse_router", "lora_r16", "lora_r32",
                 "lora_r160"):
        assert "error" not in train[case], train[case]
        assert train[case]["step"]["median_ms"] > 0
    assert train["personafuse"]["trainable_params"] == train["lora_r160"]["trainable_params"]
    assert train["personafuse_top2"]["reference"] == "lora_r32" and train["personafuse_top2"]["time_vs_reference"] > 0
    for xlora, ours in (("xlora", "personafuse"), ("xlora_classifier", "personafuse_router")):
        assert "error" in train[xlora] or train[xlora]["reference"] == ours

    decode = results["decode"]
    assert {(c["batch"], c["case"]) for c in decode["cases"]} == {
        (1, "base"), (1, "merged"), (1, "dense"), (1, "top2"), (3, "merged"), (3, "dense"), (3, "top2")}
    assert all(c["tokens_per_s"] > 0 for c in decode["cases"])
    assert decode["router_calls_per_generate"] == 1 and decode["distinct_gate_rows"] == 3
    assert decode["paths"]["torch-sparse"] > 0 and decode["paths"]["torch-dense"] > 0

    router = results["router"]
    assert router["expected_share"] == router["layer"] / router["num_layers"]

    table = (tmp_path / "results.md").read_text()
    for heading in ("Routed LoRA delta", "Training step", "Router overhead", "Greedy decoding"):
        assert heading in table
    for method in bench.TRAIN_CASES.values():
        assert method in table
    assert table in capsys.readouterr().out
