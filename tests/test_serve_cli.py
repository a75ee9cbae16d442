"""``serve-bench`` and ``simulate``: the contract of their flags, their JSON, their records and their errors."""
import json
from pathlib import Path

import pytest
from cli_helpers import run_cli
from torchrun_helpers import run_under_torchrun, stdout_or_raise

REPO = str(Path(__file__).resolve().parent.parent)

SMALL = ["--num-requests", "6", "--prompt-len", "4:24", "--output-len", "2:6", "--max-num-seqs", "3"]



def test_serve_bench_json_lists_requests_in_input_order_and_writes_a_record(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "serve-bench", "--model", "tiny", "--tp", "2", "--backend", "threads", "--rate", "50",
                           *SMALL, "--block-size", "8", "--prefix-share", "0.5", "--seed", "3", "--json",
                           "--slo-ttft-ms", "10000", "--out", str(tmp_path))
    assert code == 0
    report = json.loads(out)
    assert [r["id"] for r in report["requests"]] == list(range(6))
    for row in report["requests"]:
        assert {"id", "prompt_len", "output_ids", "ttft_ms", "tpot_ms", "latency_ms", "queue_ms"} <= set(row)
        assert row["latency_ms"] >= row["ttft_ms"] >= row["queue_ms"] >= 0
    summary = report["summary"]
    for metric in ("ttft_ms", "tpot_ms", "latency_ms", "queue_ms"):
        assert set(summary[metric]) == {"p50", "p90", "p95", "p99"}
    assert summary["goodput_req_s"] == summary["throughput_req_s"] > 0 and summary["preemptions"] == 0
    # Little's law: requests in flight (sent, queued or running) on average = the latencies over the span
    in_flight = sum(r["latency_ms"] for r in report["requests"]) / 1000 / summary["duration_s"]
    assert summary["concurrency_mean"] == pytest.approx(in_flight) and 0 < in_flight <= 6
    files = list((tmp_path / "serving").glob("*.jsonl"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["kind"] == "measured" and record["tp"] == 2 and record["env"]["git"] is not None
    assert record["scheduler"]["block_size"] == 8 and len(record["steps"]) == summary["steps"]


def test_serve_bench_prepack_and_compile_serve_the_same_tokens_and_report_the_scheduler_time(capsys):
    outputs = {}
    for flags in ([], ["--prepack"], ["--compile"]):
        code, out, _ = run_cli(capsys, "serve-bench", "--tp", "2", *SMALL, "--no-save", "--json", *flags)
        assert code == 0
        report = json.loads(out)
        outputs[tuple(flags)] = [r["output_ids"] for r in report["requests"]]
        assert 0 < report["scheduler_s"] < report["summary"]["duration_s"]
    assert outputs[("--prepack",)] == outputs[()] == outputs[("--compile",)]
    code, _, err = run_cli(capsys, "serve-bench", *SMALL, "--no-save", "--compile", "--policy", "padded")
    assert code == 2 and err.strip() == ("error: policy 'padded' runs the generation loop over a static cache: "
                                         "--compile (the paged attention kernel) needs continuous or static")


def test_serve_bench_pp_reports_the_grid_and_records_the_hops(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "serve-bench", "--tp", "2", "--pp-layers", "3,1", *SMALL, "--out", str(tmp_path))
    assert code == 0 and out.startswith("[MEASURED: tp=2 x pp=2 (4) real ranks (threads)")
    assert "p95" in out and "6 of 6 requests served" in out
    record = json.loads(next((tmp_path / "serving").glob("*.jsonl")).read_text())
    assert record["tp"] == 2 and record["pp"] == 2 and record["pipeline_comm"]["send"]["count"] > 0
    code, out, _ = run_cli(capsys, "serve-bench", "--pp", "2", *SMALL, "--no-save", "--json")
    report = json.loads(out)
    assert report["pp"] == 2 and report["summary"]["completed"] == 6 and report["pipeline_comm"]["send"]["count"] > 0


def test_serve_bench_replays_a_requests_file(capsys, tmp_path):
    load = tmp_path / "load.jsonl"
    load.write_text("\n".join(json.dumps({"prompt_ids": [5 + i, 6, 7], "max_new_tokens": 3, "arrival_s": 0.01 * i})
                              for i in range(3)))
    code, out, _ = run_cli(capsys, "serve-bench", "--requests", str(load), "--no-save", "--json")
    assert code == 0
    assert [len(r["output_ids"]) for r in json.loads(out)["requests"]] == [3, 3, 3]


@pytest.mark.parametrize("argv,message", [
    (["--rate", "0"], "--rate must be > 0"),
    (["--rate", "-2"], "--rate must be > 0"),
    (["--block-size", "12"], "power of two"),
    (["--block-size", "0"], "power of two"),
    (["--prompt-len", "250", "--output-len", "48"], "more than the model's context of 256"),
    (["--prompt-len", "9:3"], "LOW:HIGH"),
    (["--tp", "3"], "valid tp"),
    (["--prefix-share", "1.5"], "--prefix-share"),
    (["--num-requests", "1000000000000000000"], "is more than 1,000,000"),
    (["--num-requests", "1e18"], "--num-requests takes an integer"),
    (["--prompt-len", "1000000000"], "more than the model's context"),
    (["--num-blocks", "0"], "--num-blocks must be a positive integer, got 0"),
    (["--threads", "100000"], "--threads=100000 is more than"),
    (["--slo-ttft-ms", "nan"], "--slo-ttft-ms must be a finite number > 0, got nan"),
    (["--slo-tpot-ms", "-1"], "--slo-tpot-ms must be a finite number > 0"),
    (["--rate", "nan"], "--rate must be > 0"),
    (["--duration", "inf"], "--duration must be a finite number > 0"),
    (["--percentiles", "50,101"], "--percentiles takes numbers in (0, 100]"),
    (["--concurrency", "0"], "--concurrency must be a positive integer"),
    (["--concurrency", "2", "--policy", "padded"], "--concurrency needs continuous or static"),
    (["--pp", "5"], "pp=5 is more than the model's 4 decoder layers: each stage needs at least one; valid pp: 1 to 4"),
    (["--pp", "0"], "--pp must be a positive integer, got 0"),
    (["--pp-layers", "3,3"], "layers per stage 3,3 must be 2 positive counts (one per stage) that sum to the model's "
                             "4 layers, e.g. 2,2"),
    (["--pp", "2", "--policy", "padded"], "policy 'padded' runs the generation loop on one stage: --pp 2 needs"),
])
def test_serve_bench_bad_input_exits_2_with_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, "serve-bench", "--no-save", *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_a_requests_file_longer_than_the_stated_maximum_exits_2(capsys, tmp_path):
    load = tmp_path / "load.jsonl"
    load.write_text("\n".join(json.dumps({"prompt_ids": [5, 6], "max_new_tokens": 2}) for _ in range(5)))
    code, _, err = run_cli(capsys, "serve-bench", "--requests", str(load), "--num-requests", "4", "--no-save")
    assert code == 2 and "holds 5 requests, more than --num-requests=4" in err
    load.write_text('{"prompt_ids": [5, 6]}\n')
    code, _, err = run_cli(capsys, "serve-bench", "--requests", str(load), "--no-save")
    assert code == 2 and "load.jsonl:1 needs max_new_tokens" in err


def test_simulate_labels_every_figure_modelled(capsys):
    code, out, _ = run_cli(capsys, "simulate", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--tp", "4", "--dtype",
                           "fp8", "--rate", "2", "--num-requests", "30", "--prompt-len", "512:2048", "--output-len",
                           "64:256", "--max-num-seqs", "24", "--max-batched-tokens", "4096", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["label"] == "modelled (not measured)" and report["setting"]["num_blocks"] > 24 * 2048 // 16
    assert report["summary"]["completed"] == 30 and report["summary"]["ttft_ms"]["p50"] > 0
    code, out, _ = run_cli(capsys, "simulate", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--tp", "8",
                           "--num-requests", "5")
    assert code == 0 and out.startswith("[MODELLED, not measured: llama-3-70b on 8 x")


@pytest.mark.parametrize("gpu, seqs, tokens", [("h100-sxm", 1024, 8192), ("a100-sxm-80gb", 256, 2048)])
def test_simulate_defaults_to_vllms_scheduler_for_the_gpu_and_says_so(capsys, gpu, seqs, tokens):
    """A 20,000-token prompt on a 128K-context Llama 3.1 70B, a closed loop of 4, and vLLM's batch defaults."""
    code, out, _ = run_cli(capsys, "simulate", "--model", "llama-3.1-70b", "--gpu", gpu, "--tp", "4", "--num-requests",
                           "8", "--prompt-len", "20000", "--output-len", "16", "--concurrency", "4", "--json")
    assert code == 0
    report = json.loads(out)
    setting, summary = report["setting"], report["summary"]
    assert (setting["max_num_seqs"], setting["max_num_batched_tokens"]) == (seqs, tokens)
    assert "EngineArgs.get_batch_defaults" in setting["scheduler_defaults"]
    assert summary["completed"] == 8 and 1 < summary["concurrency_mean"] <= 4
    assert set(summary["ttft_ms"]) == {"p50", "p90", "p95", "p99"} and summary["goodput_req_s"] is None
    code, out, _ = run_cli(capsys, "simulate", "--model", "llama-3.1-70b", "--gpu", gpu, "--tp", "4", "--num-requests",
                           "2", "--max-num-seqs", "2", "--max-batched-tokens", "512")
    assert code == 0 and "scheduler: max_num_seqs 2, max_num_batched_tokens 512 (given)" in out
    assert "goodput n/a (no SLO" in out and "p95" in out


@pytest.mark.parametrize("argv,message", [
    (["--tp", "3"], "valid tp"),
    (["--tp", "1", "--dtype", "bf16"], "no memory for a KV cache"),
    (["--tp", "4", "--rate", "0"], "--rate must be > 0"),
    (["--tp", "4", "--block-size", "48"], "power of two"),
    (["--tp", "4", "--prompt-len", "8000", "--output-len", "500"], "more than the model's context"),
    (["--tp", "4", "--gpu", "h900"], "h900"),
    (["--tp", "4", "--max-model-len", "0"], "--max-model-len must be a positive integer, got 0"),
    (["--tp", "4", "--block-size", "0"], "power of two"),
    (["--tp", "4", "--num-blocks", "1"], "the longest request needs"),
    (["--tp", "4", "--num-requests", "1000000000000000000"], "is more than 1,000,000"),
    (["--tp", "4", "--prompt-len", "1000000000"], "more than the model's context"),
])
def test_simulate_bad_input_exits_2_with_one_line(capsys, argv, message):
    base = ["simulate", "--model", "llama-3-70b", "--gpu", "h100-sxm"]
    if "--gpu" in argv:
        base = base[:3]
    code, out, err = run_cli(capsys, *base, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.parametrize("grid", [["--tp", "2"], ["--pp", "2"]])
def test_serve_bench_under_torchrun_reports_once_from_rank_0(grid):
    done = run_under_torchrun(2, ["tplab", "serve-bench", *grid, *SMALL, "--no-save", "--json"], cwd=REPO)
    lines = [line for line in stdout_or_raise(done).splitlines() if line.startswith("{")]
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["backend"] == "torchrun" and len(report["requests"]) == 6
