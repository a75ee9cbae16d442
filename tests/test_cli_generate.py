"""``python -m tplab generate``: JSON and text output equal to HF, threads / gloo / torchrun, and clean usage errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrun_helpers import run_under_torchrun, stdout_or_raise
from transformers import AutoTokenizer

from tplab.cli import main
from tplab.specs import tiny
from tplab.testing import hf_greedy, make_checkpoint

PROMPT_IDS = ["1,5,9,12,40", "1,7"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    with_tok, hf = make_checkpoint("llama31", root / "with_tokenizer", seed=6, tokenizer=True)
    bare, bare_hf = make_checkpoint("qwen2", root / "bare", seed=6)
    return {"tok": with_tok, "hf": hf, "bare": bare, "bare_hf": bare_hf}


def reference(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    return [hf_greedy(hf, p, new, eos_token_ids=(hf.config.eos_token_id,))[0] for p in prompts]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def ids_args(*ids: str) -> list[str]:
    return [a for i in ids for a in ("--prompt-ids", i)]


def test_json_report_matches_hf_on_threads_and_gloo(checkpoints, capsys):
    prompts = [[int(t) for t in p.split(",")] for p in PROMPT_IDS]
    expected = reference(checkpoints["bare_hf"], prompts, 6)
    for backend, tp in (("threads", 4), ("gloo", 2)):
        code, out, _ = cli(capsys, "--model", str(checkpoints["bare"]), "--tp", str(tp), "--backend", backend,
                           *ids_args(*PROMPT_IDS), "--max-new-tokens", "6", "--json")
        report = json.loads(out)
        assert code == 0 and report["tokens"] == expected
        assert "text" not in report  # no tokenizer in this checkpoint
        assert report["ttft_ms"] > 0 and report["ms_per_token"] > 0 and report["tp"] == tp
        assert report["comm"]["prefill"]["all_reduce"]["count"] == 5
        assert report["comm"]["prefill"]["all_reduce"]["bytes"] == 5 * 2 * 5 * 64 * 4  # 5 x (batch, T, hidden) fp32


def test_text_prompts_are_tokenized_and_decoded(checkpoints, capsys):
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoints["tok"]))
    prompts = [tokenizer("hello world")["input_ids"], tokenizer("TP!")["input_ids"]]
    expected = reference(checkpoints["hf"], prompts, 5)
    code, out, _ = cli(capsys, "--model", str(checkpoints["tok"]), "--tp", "2", "--prompt", "hello world",
                       "--prompt", "TP!", "--max-new-tokens", "5", "--json")
    report = json.loads(out)
    assert code == 0 and report["tokens"] == expected and report["prompt_tokens"] == [12, 4]
    assert report["text"] == [tokenizer.decode(t, skip_special_tokens=True) for t in expected]
    code, out, _ = cli(capsys, "--model", str(checkpoints["tok"]), "--tp", "2", "--prompt", "hello world",
                       "--max-new-tokens", "5")
    assert code == 0 and out.startswith("--- tp=2 row 0: 12 prompt tokens, 5 new")
    assert "hello world" in out and "prefill: all_reduce x5" in out


def test_sampling_flags_give_the_same_tokens_at_every_tp(checkpoints, capsys):
    args = ["--model", str(checkpoints["bare"]), *ids_args(*PROMPT_IDS), "--max-new-tokens", "6", "--json",
            "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "11"]
    tokens = [json.loads(cli(capsys, *args, "--tp", str(tp))[1])["tokens"] for tp in (1, 2, 8)]
    assert tokens[0] == tokens[1] == tokens[2]


def test_pipeline_stages_give_the_same_text_and_report_each_stage(checkpoints, capsys):
    args = ["--model", str(checkpoints["tok"]), "--prompt", "hello world", "--prompt", "TP!", "--max-new-tokens", "5"]
    code, out, _ = cli(capsys, *args, "--json")
    alone = json.loads(out)
    code, out, _ = cli(capsys, *args, "--tp", "2", "--pp", "2", "--json")  # the checkpoint's 2 layers: 1 per stage
    staged = json.loads(out)
    assert code == 0 and (staged["text"], staged["tokens"]) == (alone["text"], alone["tokens"])
    assert [s["stage"] for s in staged["stages"]] == [0, 1] and staged["micro_batches"] == 2
    assert staged["stages"][1]["pipeline_comm"]["decode"]["recv"]["count"] == 2 * 4  # 2 micro-batches, 4 steps
    code, out, _ = cli(capsys, *args, "--pp-layers", "1,1", "--micro-batches", "1")
    assert code == 0 and "tp=1 x pp=2 (1 micro-batch)" in out and " stage 1: " in out
    assert "pipeline: recv x4" in out


def test_usage_errors_exit_2_with_one_line(checkpoints, capsys, tmp_path, monkeypatch):
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(checkpoints["bare"], gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    bare, ids = str(checkpoints["bare"]), ids_args("1,2,3")
    cases = [
        (["--model", str(tmp_path / "missing"), *ids], "is not a directory"),
        (["--model", str(gpt2), *ids], "unsupported architecture"),
        (["--model", bare, "--tp", "3", *ids], "num_attention_heads=8 is not divisible by tp=3; valid tp: 1, 2, 4, 8"),
        (["--model", bare, "--prompt-ids", ",".join(["5"] * 126), "--max-new-tokens", "3"], "more than the model's context"),
        (["--model", bare, "--prompt", "hello"], "has no tokenizer"),
        (["--model", bare, "--prompt-ids", "1,x"], "comma-separated integers"),
        (["--model", bare, *ids, "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--model", bare], "at least one --prompt"),
        (["--model", bare, *ids, "--pp", "3"], "pp=3 is more than the model's 2 decoder layers: each stage needs"),
        (["--model", bare, *ids, "--pp-layers", "2,1"], "must be 2 positive counts (one per stage) that sum to the "
                                                        "model's 2 layers, e.g. 1,1"),
        (["--model", bare, *ids, "--pp", "2", "--micro-batches", "2"], "micro_batches=2 is more than the batch of 1"),
        (["--model", bare, *ids, "--backend", "gloo", "--device", "cuda"], "backend='gloo' runs its ranks on the CPU"),
        (["--model", bare, *ids, "--device", "mps"], "thread ranks run on 'cpu' or 'cuda'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model", bare, *ids, "--device", "cuda"], "no CUDA device is visible"))
    monkeypatch.setattr(tiny, "TINY_DIR", tmp_path / "no-tiny")  # as if data/tiny were absent
    cases.append((ids, "the tiny model failed its check"))
    for args, message in cases:
        code, out, err = cli(capsys, *args)
        assert (code, out) == (2, ""), args
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert err.count("pass --model") <= 1, err  # one hint, said once


def test_tiny_resolves_through_tplab_tiny(checkpoints, capsys, monkeypatch):
    monkeypatch.setattr(tiny, "TINY_DIR", checkpoints["bare"])
    monkeypatch.setattr(tiny, "verify_tiny", lambda directory, expected: directory)
    code, out, _ = cli(capsys, *ids_args("1,2,3"), "--max-new-tokens", "2", "--json")
    assert code == 0 and len(json.loads(out)["tokens"][0]) == 2

    def checksum_mismatch(directory, expected):
        raise ValueError("checksum mismatch")
    monkeypatch.setattr(tiny, "verify_tiny", checksum_mismatch)
    code, _, err = cli(capsys, *ids_args("1,2,3"))
    assert code == 2 and "checksum mismatch" in err


def test_module_entry_point_and_torchrun(checkpoints):
    """The real processes: a usage error prints no traceback; under torchrun only rank 0 prints."""
    done = subprocess.run([sys.executable, "-m", "tplab", "generate", "--model", "/no/such/dir", "--prompt-ids", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    prompts = [[int(t) for t in p.split(",")] for p in PROMPT_IDS]
    out = stdout_or_raise(run_under_torchrun(2, [
        "tplab", "generate", "--model", str(checkpoints["bare"]), "--tp", "2", *ids_args(*PROMPT_IDS),
        "--max-new-tokens", "4", "--json"]))
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    report = json.loads(lines[0])
    assert report["backend"] == "torchrun" and report["tokens"] == reference(checkpoints["bare_hf"], prompts, 4)


def _damaged_checkpoints(checkpoints, root) -> dict[str, tuple[Path, str]]:
    """One broken copy of the bare checkpoint per way a download or an edit can break it, with the expected message."""
    from safetensors.torch import load_file, save_file

    def copy(name):
        shutil.copytree(checkpoints["bare"], root / name)
        return root / name

    weights = load_file(checkpoints["bare"] / "model.safetensors")
    out = {}
    cut = copy("truncated")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = (cut, "is truncated")
    garbage = copy("corrupt")
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    out["corrupt"] = (garbage, "is not a readable safetensors file")
    for name, change, message in [
        ("wrong_shape", lambda w: w | {"model.norm.weight": torch.ones(3)}, "model.norm.weight in"),
        ("missing_tensor", lambda w: {k: v for k, v in w.items() if k != "model.layers.0.self_attn.o_proj.weight"},
         "'model.layers.0.self_attn.o_proj.weight' is missing"),
        ("nan", lambda w: w | {"model.layers.1.mlp.up_proj.weight": w["model.layers.1.mlp.up_proj.weight"] * float("nan")},
         "model.layers.1.mlp.up_proj.weight in"),
    ]:
        broken = copy(name)
        save_file(change(dict(weights)), broken / "model.safetensors")
        out[name] = (broken, message)
    more = copy("more_layers")
    config = json.loads((more / "config.json").read_text())
    extra = {"num_hidden_layers": config["num_hidden_layers"] + 1}
    if "layer_types" in config:  # consistent, so that what is missing is the layer's tensors
        extra["layer_types"] = config["layer_types"] + config["layer_types"][-1:]
    (more / "config.json").write_text(json.dumps({**config, **extra}))
    out["more_layers"] = (more, f"'model.layers.{config['num_hidden_layers']}.")
    bad_json = copy("bad_json")
    (bad_json / "config.json").write_text("{not json")
    out["bad_json"] = (bad_json, f"{bad_json / 'config.json'} is not valid JSON")
    for name, value, message in [("no_heads", None, "config.json: lacks num_attention_heads"),
                                 ("zero_heads", 0, "num_attention_heads must be a positive integer, got 0")]:
        broken = copy(name)
        fields = {k: v for k, v in config.items() if k != "num_attention_heads"}
        (broken / "config.json").write_text(json.dumps(fields if value is None else {**fields, "num_attention_heads": value}))
        out[name] = (broken, message)
    as_list = copy("list_config")
    (as_list / "config.json").write_text("[1, 2]")
    out["list_config"] = (as_list, "must hold a JSON object, got a list")
    for name, length in [("absurd_header_length", 1 << 62), ("random_bytes", None)]:
        broken = copy(name)
        head = (length.to_bytes(8, "little") + b"{}") if length else bytes(range(256)) * 4
        (broken / "model.safetensors").write_bytes(head)
        out[name] = (broken, "is not a readable safetensors file")
    outside = copy("index_outside")
    (outside / "model.safetensors").rename(outside / "model-00001-of-00001.safetensors")
    (outside / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: "../model-00001-of-00001.safetensors" for name in weights}}))
    out["index_outside"] = (outside, "maps tensors to files outside")
    for name, fields, message in [  # malformed fields, each refused by name (not replaced, not left to crash later)
        ("negative_head_dim", {"head_dim": -8}, "head_dim must be a positive integer, got -8"),
        ("string_head_dim", {"head_dim": "8"}, "head_dim must be a positive integer, got '8'"),
        ("list_rope", {"rope_parameters": [1]}, "rope_parameters must be a JSON object"),
        ("number_rope_scaling", {"rope_scaling": 5}, "rope_scaling must be a JSON object"),
        ("negative_rope_factor", {"rope_parameters": {"rope_type": "linear", "factor": -2.0}},
         "factor must be a finite number > 0, got -2.0"),
        ("list_quantization", {"quantization_config": 3}, "quantization_config must be a JSON object"),
        ("float_eos", {"eos_token_id": 1.5}, "eos_token_id must be a token id"),
        ("null_eps", {"rms_norm_eps": None}, "rms_norm_eps must be a finite number > 0, got None"),
        ("string_bool", {"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        ("layer_types_length", {"layer_types": ["full_attention"]}, "layer_types must list one of"),
        ("zero_context", {"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer, got 0"),
        ("absurd_layers", {"num_hidden_layers": 10**9}, "num_hidden_layers=1,000,000,000 is more than 10,000"),
        ("absurd_heads", {"num_attention_heads": 10**12}, "num_attention_heads=1,000,000,000,000 is more than"),
    ]:
        broken = copy(name)
        (broken / "config.json").write_text(json.dumps({**config, **fields}))
        out[name] = (broken, message)
    fp8 = copy("fp8_without_scales")
    (fp8 / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    out["fp8_without_scales"] = (fp8, "weight_scale' is missing from the checkpoint")
    return out


def test_a_damaged_checkpoint_or_config_is_one_line_and_exit_2(checkpoints, capsys, tmp_path):
    for name, (path, message) in _damaged_checkpoints(checkpoints, tmp_path).items():
        code, out, err = cli(capsys, "--model", str(path), *ids_args("1,2,3"))
        assert (code, out) == (2, ""), name
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (name, err)
    sharded, _ = make_checkpoint("llama", tmp_path / "sharded", max_shard_size="40KB")
    next(iter(sorted(sharded.glob("model-*.safetensors")))).unlink()
    capsys.readouterr()  # the progress bar of writing the shards
    code, _, err = cli(capsys, "--model", str(sharded), *ids_args("1,2,3"))
    assert code == 2 and "file(s) that are not in" in err and err.count("\n") == 1


@pytest.mark.parametrize("backend", ["threads", "gloo"])
def test_a_rank_that_finds_damaged_weights_reports_one_line(checkpoints, capsys, tmp_path, monkeypatch, backend):
    """The check before launch is skipped: the rank itself finds the NaN while loading its shard."""
    from tplab.commands import generate as generate_command
    monkeypatch.setattr(generate_command, "check_checkpoint", lambda *a: 0)
    path, message = _damaged_checkpoints(checkpoints, tmp_path)["nan"]
    code, out, err = cli(capsys, "--model", str(path), "--tp", "2", "--backend", backend, *ids_args("1,2,3"))
    assert (code, out) == (2, "") and message in err and err.count("\n") == 1, err


def test_bad_seed_and_device_are_one_line(checkpoints, capsys):
    for args, message in [(["--seed", str(2 ** 64)], "seed must be an integer in [0, 2**63)"),
                          (["--seed", "-1"], "seed must be an integer"),
                          (["--device", "tpu"], "unknown device 'tpu'")]:
        code, out, err = cli(capsys, "--model", str(checkpoints["bare"]), *ids_args("1,2,3"), *args)
        assert (code, out) == (2, "") and message in err and err.count("\n") == 1, err


def test_what_cannot_fit_in_free_memory_is_refused_before_allocating(checkpoints, capsys, monkeypatch):
    from tplab import memory
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**8)  # a machine with 0.1 GB free
    many = ids_args(*["1,2,3,4,5,6,7,8"] * 20000)
    code, out, err = cli(capsys, "--model", str(checkpoints["bare"]), *many, "--max-new-tokens", "100")
    assert (code, out) == (2, "") and err.count("\n") == 1, err
    assert "generating 20000 prompt(s) of up to 8 tokens + 100 new at tp=1" in err
    assert "but this machine has 0.10 GB free" in err


def test_compiled_thread_ranks_are_sized_with_the_frozen_copies_of_the_weights(monkeypatch):
    import argparse

    from tplab import memory
    from tplab.commands.generate import check_host_memory
    from tplab.errors import InputError
    from tplab.specs.model import resolve_model

    parameters = 10**6  # 4 MB in float32
    monkeypatch.setattr(memory, "available_bytes", lambda: int(2.5 * 4 * parameters))
    config, args = resolve_model("tiny"), argparse.Namespace(compile="default", backend="threads", max_new_tokens=1, pp=1)
    check_host_memory(config, parameters, torch.float32, [[5]], 1, args, runs=1)  # the module's copy + 1 frozen
    with pytest.raises(InputError, match="needs 0.01 GB"):  # + the last tp's, until its runners are collected
        check_host_memory(config, parameters, torch.float32, [[5]], 1, args, runs=2)


def test_other_commands_refuse_bad_input_in_one_line(capsys, monkeypatch):
    from tplab import memory
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9)
    for args, message in [(["comm-bench", "--sizes", str(64 * 2**30)], "needs 412.76 GB, but this machine has 1.00 GB"),
                          (["comm-bench", "--tp", "1000", "--backend", "gloo", "--sizes", "4"], "on 1000 gloo ranks"),
                          (["comm-bench", "--sizes", "64GiB"], "comma-separated integers"),
                          (["demo", "--tp", "3"], "ffn=256 is not divisible by tp=3"),
                          (["demo", "--tp", "0"], "tp must be"),
                          (["demo", "--tp", "x"], "comma-separated integers"),
                          (["demo", "--backend", "mpi"], "--backend mpi: choose from threads,gloo")]:
        code = main(args)
        out, err = capsys.readouterr()
        assert (code, out) == (2, "") and message in err and err.count("\n") == 1, (args, err)


def test_several_tp_degrees_are_compared_and_the_prompt_is_marked_off(checkpoints, capsys):
    code, out, _ = cli(capsys, "--model", str(checkpoints["tok"]), "--tp", "1,2,4", "--prompt", "hello world",
                       "--prompt", "abc", "--max-new-tokens", "4")
    assert code == 0
    lines = out.splitlines()
    assert lines[-2] == "identical tokens at tp 1, 2, 4: every row, every token"
    assert lines[-1].startswith("what this compares: the tokens.") and "is not what tp buys" in lines[-1]
    assert sum(line == "[prompt]    hello world" for line in lines) == 3 and sum(l.startswith("[generated] ") for l in lines) == 6
    per_rank = max(1, (os.cpu_count() or 1) // 2)  # the cores shared out among 2 ranks
    assert f"tp=2 (threads, cpu, {per_rank} thread(s) per rank; timed after a warm-up)" in out


def test_compare_tokens_names_the_first_difference():
    from tplab.commands.generate import compare_tokens
    assert compare_tokens({1: [[5, 6], [7]], 2: [[5, 6], [7]]}) is None
    assert compare_tokens({1: [[5, 6], [7]], 4: [[5, 6], [7, 8]], 8: [[5, 9], [7]]}) == \
        "tokens DIFFER: tp=4 row 1 departs from tp=1 at new token 1"
