"""Calibration on synthetic GPU measurements: known efficiencies in, the same efficiencies out, with provenance.

The synthetic records are what the cost model itself predicts with chosen
efficiencies (memory 0.55, compute 0.45, link 0.7) for Llama-3-70B on an
H100: emulated records (compute times, modelled collectives) and measured
ones (timed collectives). Calibrating from them must recover the chosen
values, write a file the cost model loads, and refuse CPU records.
"""
import json

import pytest

from tplab.bench.calibration import calibrate, write_efficiency
from tplab.bench.emulation import modelled_seconds
from tplab.cli import main
from tplab.perf.estimate import estimate, overhead_seconds, step_seconds
from tplab.perf.shapes import step_work
from tplab.specs.efficiency import EFFICIENCY_FILE, load_efficiency
from tplab.specs.hardware import load_gpu
from tplab.specs.model import resolve_model

TRUE = {"memory_bandwidth": 0.55, "compute": 0.45, "link": 0.7}
H100 = load_gpu("h100-sxm")
LLAMA = resolve_model("llama-3-70b")
CONFIG = LLAMA.to_config_dict()


def synthetic(kind, tp, batch, prompt_len, layers=2, steps=16, device=("cuda", "NVIDIA H100 80GB HBM3"),
              eff=TRUE, source="synthetic.jsonl"):
    """A record whose times are the cost model's prediction at efficiencies ``eff`` (graph decode, bf16)."""
    e = load_efficiency(eff)
    link = H100.link("nvlink", tp)
    decode = step_work(LLAMA, tp, "bf16", "bf16", batch, 1, prompt_len + steps - 1, layers=layers)
    prefill = step_work(LLAMA, tp, "bf16", "bf16", batch, prompt_len, 0, layers=layers)

    def compute_ms(work):
        parts = step_seconds(work, H100, link, tp, "bf16", e)
        return 1e3 * (parts["weights"] + parts["kv_cache"] + parts["compute"] + parts["fixed"] + parts["per_sequence"])

    calls = {"all_reduce": (decode.all_reduces, prefill.all_reduce_bytes), "all_gather": (1, 2 * batch * tp)}
    comm = {op: {"count": n, "bytes": n * size, "seconds": n * modelled_seconds(op, size, tp, link, e)}
            for op, (n, size) in calls.items()}
    return {
        "kind": kind, "source_file": source,
        "env": {"device": {"type": device[0], "name": device[1]}, "date": "2025-01-02T00:00:00+00:00",
                "git": {"commit": "0123456789abcdef"}},
        "model": {"name": "llama-3-70b", "config": CONFIG, "layers_built": layers},
        "setting": {"tp": tp, "batch": batch, "prompt_len": prompt_len, "decode_steps": steps, "dtype": "bfloat16",
                    "decode_mode": "graph"},
        "decode_compute_ms": {"median": compute_ms(decode)}, "ttft_compute_ms": {"median": compute_ms(prefill)},
        "ttft_comm_ms": 1e3 * sum(s["seconds"] for s in comm.values()), "comm": {"prefill": comm},
    }


def records():
    out = [synthetic("emulated", tp, b, p) for tp in (2, 4, 8) for b in (1, 32) for p in (128, 2048)]
    return out + [synthetic("measured", 8, 8, 2048, source="torchrun.jsonl")]


def test_calibration_recovers_the_efficiencies_that_made_the_measurements(tmp_path):
    result = calibrate(records(), "h100-sxm")
    for key, value in TRUE.items():
        assert result[key]["value"] == pytest.approx(value, rel=1e-9)
    assert result["link"]["records"] == 1  # only the measured record times real collectives
    assert result["memory_bandwidth"]["records"] >= 6 and result["compute"]["records"] >= 3
    provenance = result["memory_bandwidth"]["provenance"]
    for fact in ("NVIDIA H100 80GB HBM3", "synthetic.jsonl", "2025-01-02", "0123456789", "memory-bound decode steps"):
        assert fact in provenance
    assert "H100 SXM5" in result["about"] and "this GPU only" in result["about"]

    path = write_efficiency(result, tmp_path / "eff.json")
    loaded, default = load_efficiency(path), load_efficiency()
    assert (loaded.memory_bandwidth, loaded.compute, loaded.link) == pytest.approx((0.55, 0.45, 0.7))
    assert loaded.runtime_overhead_gb == default.runtime_overhead_gb  # not calibrated: the default stays
    slow = estimate(model="llama-3-70b", gpu="h100-sxm", tp=8, batch=1, efficiency=path)
    fast = estimate(model="llama-3-70b", gpu="h100-sxm", tp=8, batch=1)
    ratio = slow.breakdown["decode_ms"]["weights"] / fast.breakdown["decode_ms"]["weights"]
    assert ratio == pytest.approx(default.memory_bandwidth / 0.55)


def test_emulated_records_never_calibrate_the_link():
    result = calibrate([r for r in records() if r["kind"] == "emulated"], "h100-sxm")
    assert "link" not in result and "memory_bandwidth" in result


def test_a_fraction_above_one_is_capped_and_said_so():
    result = calibrate([synthetic("emulated", 8, 1, 128, eff={"memory_bandwidth": 1.0})], "h100-sxm")
    too_fast = synthetic("emulated", 8, 1, 128)
    work = step_work(LLAMA, 8, "bf16", "bf16", 1, 1, 128 + 16 - 1, layers=2)
    fixed_ms = 1e3 * sum(overhead_seconds(work, load_efficiency(TRUE), "graph").values())
    memory_ms = too_fast["decode_compute_ms"]["median"] - fixed_ms
    too_fast["decode_compute_ms"]["median"] = fixed_ms + memory_ms / 2  # twice the datasheet bandwidth: 1.1
    capped = calibrate([too_fast], "h100-sxm")["memory_bandwidth"]
    assert result["memory_bandwidth"]["value"] == pytest.approx(1.0)
    assert capped["value"] == 1.0 and capped["raw_median"] == pytest.approx(1.1) and "capped" in capped["provenance"]


def test_cpu_mixed_or_mismatched_records_are_refused():
    with pytest.raises(ValueError, match="CPU measurements cannot calibrate a GPU"):
        calibrate([synthetic("emulated", 8, 1, 128, device=("cpu", "Intel Xeon"))], "h100-sxm")
    mixed = [synthetic("emulated", 8, 1, 128), synthetic("emulated", 8, 1, 128, device=("cuda", "NVIDIA A100-SXM4-80GB"))]
    with pytest.raises(ValueError, match="several devices"):
        calibrate(mixed, "h100-sxm")
    with pytest.raises(ValueError, match="not on a NVIDIA H100 SXM5.*pass --gpu a100-sxm-80gb"):
        calibrate([synthetic("emulated", 8, 1, 128, device=("cuda", "NVIDIA A100-SXM4-80GB"))], "h100-sxm")
    with pytest.raises(ValueError, match="pass --gpu h100-pcie"):  # the same chip, another part: other peaks
        calibrate([synthetic("emulated", 8, 1, 128, device=("cuda", "NVIDIA H100 PCIe"))], "h100-sxm")
    with pytest.raises(ValueError, match="'NVIDIA H100 NVL', a name no GPU of data/hardware/gpus lists"):
        calibrate([synthetic("emulated", 8, 1, 128, device=("cuda", "NVIDIA H100 NVL"))], "h100-sxm")
    with pytest.raises(ValueError, match="no measurement records"):
        calibrate([], "h100-sxm")
    fp32 = synthetic("emulated", 8, 1, 128)
    fp32["setting"]["dtype"] = "float32"
    with pytest.raises(ValueError, match="no record could calibrate any factor"):
        calibrate([fp32], "h100-sxm")


def test_cli_writes_the_calibrated_file(tmp_path, capsys):
    source = tmp_path / "run.jsonl"
    source.write_text("".join(json.dumps({**r, "schema": 1}) + "\n" for r in records()))
    out = tmp_path / "calibrated.json"
    assert main(["bench", "--calibrate", str(source), "--gpu", "h100-sxm", "--efficiency-out", str(out)]) == 0
    assert "memory_bandwidth = 0.55" in capsys.readouterr().out
    assert load_efficiency(out).link == pytest.approx(0.7)
    assert main(["bench", "--calibrate", str(source)]) == 2
    assert "--efficiency-out" in capsys.readouterr().err


def test_the_cli_never_replaces_a_file_silently_nor_the_shipped_defaults(tmp_path, capsys):
    source = tmp_path / "run.jsonl"
    source.write_text("".join(json.dumps({**r, "schema": 1}) + "\n" for r in records()))
    defaults = EFFICIENCY_FILE.read_bytes()
    for force in ([], ["--force"]):  # the defaults file is refused even with --force
        assert main(["bench", "--calibrate", str(source), "--efficiency-out", str(EFFICIENCY_FILE), *force]) == 2
        assert "holds the defaults every estimate starts from" in capsys.readouterr().err
    assert EFFICIENCY_FILE.read_bytes() == defaults
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    assert main(["bench", "--calibrate", str(source), "--efficiency-out", str(mine)]) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err and mine.read_text() == "{}"
    assert main(["bench", "--calibrate", str(source), "--efficiency-out", str(mine), "--force"]) == 0
    assert load_efficiency(mine).link == pytest.approx(0.7)


def test_a_file_that_fails_its_check_replaces_nothing(tmp_path):
    target = tmp_path / "eff.json"
    target.write_text("old")
    with pytest.raises(ValueError, match="efficiency link=7"):
        write_efficiency({"about": "x", "link": {"value": 7}}, target, force=True)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["eff.json"]  # no temporary left
