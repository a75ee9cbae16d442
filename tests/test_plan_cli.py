"""``python -m tplab plan``: a labelled table, and one-line errors with exit code 2."""
import subprocess
import sys

import pytest

from tplab.cli import main

ARGS = ["plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--tp", "1,2,4,8", "--batch", "1,16", "--context", "8192",
        "--dtype", "bf16"]


def test_plan_prints_a_modelled_table_for_every_tp_and_batch(capsys):
    assert main(ARGS + ["--price", "2.5"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("MODELLED estimates, not measurements: llama-3-70b on NVIDIA H100 SXM5 80GB")
    assert "7936 prompt + 256 output tokens" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["tp", "batch"])
    rows = [line.split() for line in lines[header + 1:header + 9]]
    assert [(r[0], r[1]) for r in rows] == [(str(t), str(b)) for t in (1, 2, 4, 8) for b in (1, 16)]
    assert {r[7] for r in rows[:2]} == {"NO"} and {r[7] for r in rows[4:]} == {"yes"}  # 141 GB of weights: tp=1 cannot fit
    assert all(float(r[12]) > 0 for r in rows)  # the cost column, at the price given
    assert {r[2] for r in rows[:2]} == {"-"} and {r[2] for r in rows[2:]} == {"nvlink"}  # one GPU uses no link
    for r in rows:  # the total is the three memory columns, each rounded to 0.1 GB
        assert abs(float(r[6].split("/")[0]) - sum(map(float, r[3:6]))) <= 0.15
    assert "total = weights + KV + act+rt" in out
    assert "minimum tp that fits batch 1: tp=4" in out
    assert lines[-1] == "all figures above are modelled (not measured)"


def test_without_a_price_the_cost_column_is_empty_and_notes_are_printed(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--gpu", "a100-sxm-80gb", "--tp", "1,2", "--dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.split()[:2] == ["1", "1"])
    assert row[12] == "-"
    assert "note: a100-sxm-80gb has no FP8 tensor cores: fp8 is modelled as weight-only W8A16" in out


@pytest.mark.parametrize("change, message", [
    (["--gpu", "b200"], "error: unknown GPU 'b200'; known: a100-pcie-80gb, a100-sxm-80gb, h100-pcie, h100-sxm, h200, "
                        "l40s, rtx-4090"),
    (["--tp", "3"], "error: num_attention_heads=64 is not divisible by tp=3; valid tp: 1, 2, 4, 8, 16, 32, 64"),
    (["--tp", "2,x"], "error: --tp takes comma-separated integers, got '2,x'"),
    (["--model", "llama-9"], "error: unknown model 'llama-9'; known: llama-2-13b, llama-2-70b, llama-2-7b, llama-3-70b, "
                             "llama-3-8b, llama-3.1-405b, llama-3.1-70b, llama-3.1-8b, llama-3.3-70b, mistral-7b, mixtral-8x22b, mixtral-8x7b, qwen2-72b, qwen3-235b-a22b, qwen3-30b-a3b; or pass the path of a Hugging Face config.json, a checkpoint directory, or a bundled model (tiny, tiny-moe)"),
    (["--context", "9000"], "error: prompt_len + output_len = 9000 exceeds llama-3-70b's max_position_embeddings=8192"),
    (["--context", "200"], "error: --output=256 must be at least 1 and less than --context=200"),
])
def test_errors_are_one_line_with_exit_code_2(capsys, change, message):
    args = list(ARGS)
    for flag, value in zip(change[::2], change[1::2]):
        args[args.index(flag) + 1] = value
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == message + "\n" and captured.out == ""


def test_the_module_entry_point_exits_2_without_a_traceback():
    bad = subprocess.run([sys.executable, "-m", "tplab", "plan", "--model", "llama-3-70b", "--gpu", "tpu"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: unknown GPU 'tpu'") and len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize("price", ["nan", "-1", "inf"])
def test_a_price_that_is_not_a_finite_number_is_refused_not_replaced(capsys, price):
    with pytest.raises(SystemExit) as exit_:
        main(ARGS + ["--price", price])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--price must be a finite number >= 0" in err
