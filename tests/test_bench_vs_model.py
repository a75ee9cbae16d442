"""GPU records beside the cost model for their GPU (tplab.bench.vs_model).

No GPU record is committed, so the tests relabel copies of the committed CPU
records as if an H200 had taken them: only the bookkeeping is under test
(which spec, which point, which side of the comparison), never the numbers.
"""
import copy

import pytest

from tplab.bench.records import full_model_ms, load_records
from tplab.bench.vs_model import by_gpu, modelled_for
from tplab.paths import DATA_DIR
from tplab.plots.measurements import plot_against_model


@pytest.fixture(scope="module")
def committed():
    return [r for r in load_records(DATA_DIR / "measurements") if r["kind"] == "emulated"]


def as_taken_on(record: dict, device_name: str) -> dict:
    out = copy.deepcopy(record)
    out["env"]["device"] = {**out["env"]["device"], "type": "cuda", "name": device_name}
    return out


def test_cpu_records_have_no_gpu_to_compare_with(committed):
    assert committed and by_gpu(committed) == {}


def test_each_gpu_record_meets_the_model_at_its_own_point(committed):
    relabelled = [as_taken_on(r, "NVIDIA H200") for r in committed]
    pairs = by_gpu(relabelled + [as_taken_on(committed[0], "NVIDIA H100 NVL")])  # unknown part: left out
    assert list(pairs) == ["h200"] and len(pairs["h200"]) == len(committed)
    for r, e in pairs["h200"]:
        s = r["setting"]
        assert (e.model, e.tp, e.batch, e.prompt_len, e.output_len) == (
            r["model"]["name"], s["tp"], s["batch"], s["prompt_len"], s["decode_steps"])
        assert e.gpu == "h200" and e.interconnect == s["link"]["interconnect"] and e.dtype == "bf16"
        # 1 of 80 layers was built: the record's side is its extrapolation to all 80, as the model's is
        assert full_model_ms(r, "decode_ms_per_token") == r["scaled"]["decode_ms_per_token"]
    fp32 = as_taken_on(committed[0], "NVIDIA H200")
    fp32["setting"]["dtype"] = "float32"
    assert modelled_for(fp32) is None


def test_the_figure_shows_both_sides_per_prompt_length(committed):
    pairs = by_gpu([as_taken_on(r, "NVIDIA H200") for r in committed])["h200"]
    fig = plot_against_model(pairs, "test")
    prompts = {r["setting"]["prompt_len"] for r, _ in pairs}
    assert len(fig.axes) == 2 * len(prompts)
    for ax in fig.axes:
        assert "(emulated / modelled)" in ax.get_title() and ax.get_xlabel() == "batch (sequences)"
        assert "(ms)" in ax.get_ylabel()
        labels = [line.get_label() for line in ax.get_lines()]
        assert "tp=8 (emulated)" in labels and "tp=8 (modelled)" in labels
