"""Files a user names on the command line: refused in one line (exit 2) before any work when they are not what the
flag needs; a user's other file is never appended to."""
import os

import pytest
from cli_helpers import run_cli


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def test_a_pipe_or_a_folder_where_a_file_is_expected(capsys, tmp_path, fifo):
    for argv in (["quality", "--quant", "int8", "--prompts", str(fifo)],
                 ["quality", "--quant", "int8", "--prompts", str(tmp_path)],
                 ["serve-bench", "--no-save", "--requests", str(fifo)],
                 ["plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--efficiency", str(tmp_path)]):
        code, out, err = run_cli(capsys, *argv)
        assert (code, out) == (2, ""), argv
        assert err.count("\n") == 1 and "is not a regular file (a folder, a pipe or a device)" in err, (argv, err)


@pytest.mark.parametrize("text, message", [("[1, 2, 3]", "takes a JSON object of data/efficiency.json's shape"),
                                           ("{not json", "is not JSON"),
                                           ('{"compute": NaN}', "efficiency compute=nan must be a fraction")])
def test_an_efficiency_file_of_the_wrong_shape(capsys, tmp_path, text, message):
    path = tmp_path / "eff.json"
    path.write_text(text)
    code, out, err = run_cli(capsys, "plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--efficiency", str(path))
    assert (code, out) == (2, "") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("name, text", [("notes.txt", "my notes\n"), ("runs.jsonl", '{"mine": 1}\n')])
def test_serve_bench_out_is_checked_before_the_run_and_a_users_file_is_left_alone(capsys, tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    code, out, err = run_cli(capsys, "serve-bench", "--num-requests", "2", "--out", str(path))
    assert (code, out) == (2, "") and err.count("\n") == 1 and str(path) in err, err
    assert path.read_text() == text


def test_comm_bench_reports_its_measurements_when_no_fit_is_possible(capsys, monkeypatch):
    from tplab.commands import comm_bench
    monkeypatch.setattr(comm_bench, "measure_all_reduce", lambda sizes, *a: [1e-3 / (i + 1) for i in range(len(sizes))])
    code, out, err = run_cli(capsys, "comm-bench", "--tp", "2", "--sizes", "1024,65536,1048576")
    assert code == 0 and err == ""
    assert out.count("\n") == 6 and "no α-β fit: the measured times do not grow with message size" in out


def test_command_line_records_go_where_git_ignores_them():
    import subprocess

    from tplab.paths import DATA_DIR, in_checkout, local_records_dir
    if not in_checkout():
        pytest.skip("an installed wheel writes to the current directory")
    assert local_records_dir() == DATA_DIR / "measurements" / "local"
    probe = local_records_dir() / "serving" / "2026-01-01_cpu_serving_0.jsonl"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=DATA_DIR.parent)
    assert ignored.returncode == 0, "data/measurements/local/ must be ignored by git"
