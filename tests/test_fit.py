"""The published figures, the fit of the cost model to them, and what the fit claims: the committed
efficiencies are what the fit gives, the cross-validated median errors are within 10%, 70B never enters it."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tplab.bench.fit import FITTED, cross_validate, error_table, fit
from tplab.bench.published import FIGURES_FILE, HELD_OUT_FILE, HELD_OUT_MODELS, METRICS, load_figures, predict
from tplab.perf import estimate
from tplab.specs.efficiency import EFFICIENCY_FILE, load_efficiency
from tplab.specs.hardware import gpu_names
from tplab.specs.model import model_names

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"id", "metric", "value", "unit", "model", "gpu", "interconnect", "tp", "batch", "concurrency", "prompt_len",
          "output_len", "dtype", "engine", "engine_version", "engine_profile", "source", "notes"}


@pytest.fixture(scope="module")
def figures():
    return load_figures(FIGURES_FILE)


def test_every_figure_says_where_it_was_published_and_what_was_run(figures):
    held = load_figures(HELD_OUT_FILE)
    assert len(figures) >= 40
    for f in figures + held:
        assert set(f) == FIELDS, f["id"]
        assert f["model"] in model_names() and f["gpu"] in gpu_names() and f["value"] > 0
        assert f["source"]["title"] and f["source"]["where"] and f["source"]["commit"]
    assert {f["metric"] for f in figures} == set(METRICS)
    assert {"bf16", "fp16", "fp8"} <= {f["dtype"] for f in figures}
    assert {"a100-sxm-80gb", "h100-sxm", "h200", "l40s"} <= {f["gpu"] for f in figures}
    assert {1, 2, 4, 8} <= {f["tp"] for f in figures}
    assert not {f["model"] for f in figures} & set(HELD_OUT_MODELS)  # the 70B answers stay a prediction
    assert {f["model"] for f in held} <= set(HELD_OUT_MODELS)


def test_the_committed_efficiencies_are_what_the_fit_gives(figures):
    fitted, committed = fit(figures, load_efficiency()), json.loads(EFFICIENCY_FILE.read_text())
    for name in FITTED:
        assert getattr(fitted, name) == pytest.approx(committed[name]["value"], rel=1e-3), name
        assert committed[name]["provenance"].startswith("fitted by scripts/fit_cost_model.py")


def test_cross_validated_median_error_is_within_ten_percent_for_each_metric(figures):
    table = error_table(cross_validate(figures, load_efficiency()))
    assert set(table) == {(m,) for m in METRICS}
    assert all(e["median"] <= 0.10 for e in table.values()), table


def test_the_fit_beats_the_plain_roofline_on_decode(figures):
    roofline = load_efficiency({name: 0.0 for name in FITTED if name.endswith("_us")})
    decode = [f for f in figures if f["metric"] == "decode_ms_per_token"]
    plain = error_table([(f, predict(f, roofline)) for f in decode])[("decode_ms_per_token",)]["median"]
    fitted = error_table([(f, predict(f, load_efficiency())) for f in decode])[("decode_ms_per_token",)]["median"]
    assert fitted < plain / 2  # the fixed per-layer and per-step times are most of the gap


def test_engine_profiles_set_the_fixed_overheads():
    kw = dict(model="llama-3-8b", gpu="h100-sxm", tp=1, batch=1, prompt_len=128, output_len=128)
    graph, eager = estimate(**kw).decode_ms_per_token, estimate(**kw, engine="eager").decode_ms_per_token
    eff = load_efficiency()
    extra = 32 * (eff.eager_layer_overhead_us - eff.layer_overhead_us) + eff.eager_step_overhead_us - eff.step_overhead_us
    assert math.isclose(eager - graph, extra / 1e3, rel_tol=1e-9)
    with pytest.raises(ValueError, match="unknown engine profile 'jit'"):
        estimate(**kw, engine="jit")


def test_the_fit_script_refuses_to_replace_the_efficiencies_without_force(tmp_path):
    target = tmp_path / "eff.json"
    target.write_text("{}")
    done = subprocess.run([sys.executable, "scripts/fit_cost_model.py", "--write", "--out", str(target)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "exists; pass --force" in done.stderr and target.read_text() == "{}"


def test_the_peers_scored_every_figure_in_every_setting_and_tplab_is_closer():
    from tplab.bench.published import PEER_SCORES_FILE, peer_pairs

    lines = PEER_SCORES_FILE.read_text().splitlines()
    assert set(json.loads(lines[0])["hand_work"]) == {"llm-analysis 0.2.2", "genz-llm 0.0.16"}
    everything = load_figures(FIGURES_FILE) + load_figures(HELD_OUT_FILE)
    pairs = peer_pairs(everything)
    assert len(pairs) == 5 and all(len(p) == len(everything) for p in pairs.values())  # no row refused
    ours = error_table(cross_validate(load_figures(FIGURES_FILE), load_efficiency()))
    for setting, rows in peer_pairs(load_figures(FIGURES_FILE)).items():
        theirs = error_table(rows)
        assert all(ours[m]["median"] < theirs[m]["median"] for m in ours), setting


def test_the_peer_script_refuses_to_replace_its_scores_without_force(tmp_path):
    target = tmp_path / "scores.jsonl"
    target.write_text("x")
    done = subprocess.run([sys.executable, "scripts/score_peers.py", "--out", str(target)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "pass --force" in done.stderr and target.read_text() == "x"
