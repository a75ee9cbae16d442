"""One model description, one forward pass, one path from the command line to a token.

* One ``ModelConfig`` serves the decoder and the cost model: strict for what
  tplab runs, shapes only for what the cost model estimates.
* Both spellings of a precision work at every command line (bf16 and bfloat16).
* ``generate`` reads config.json once; the ranks get the ModelConfig, the dtype
  and the SamplingParams as they are.
* Only the decoder walks its layers: every loop drives one ``ModelRunner``, whose steps are its forward pass.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from tplab import launch
from tplab.bench import BenchSpec
from tplab.cli import main
from tplab.engine.runner import ModelRunner
from tplab.model.decoder import TPCausalLM
from tplab.model.loading import from_hf_model
from tplab.perf import estimate
from tplab.specs.dtypes import precision, torch_name
from tplab.specs.model import ModelConfig, resolve_model
from tplab.testing import build_hf_model, distinct_prompts, hf_config, make_checkpoint

PACKAGE = Path(__file__).resolve().parent.parent / "tplab"


def test_shapes_only_mode_estimates_what_the_decoder_refuses():
    fields = {**hf_config("llama").to_dict(), "model_type": "gpt_neox", "hidden_act": "gelu"}
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_dict(fields)
    shapes = ModelConfig.from_dict(fields, strict=False, name="neox-like")
    assert "unsupported architecture" in shapes.unsupported
    assert estimate(model=shapes, gpu="h100-sxm", tp=2, prompt_len=16, output_len=8).decode_ms_per_token > 0
    with pytest.raises(ValueError, match="unsupported architecture"):
        TPCausalLM(shapes, launch(lambda dist: dist, 1, "threads")[0])


def test_one_description_serves_the_model_and_the_cost_model():
    tiny = resolve_model("tiny")
    assert tiny.name == "tiny" and tiny.directory is not None and tiny.unsupported is None
    assert resolve_model("tiny", strict=False) == tiny
    for tp in tiny.valid_tp():
        assert tiny.kv_bytes_per_token(tp, torch.float32) == tiny.kv_bytes_per_token(tp, "fp32") \
            == tiny.kv_bytes_per_token(tp, "float32")
    modelled = estimate(model="tiny", gpu="h100-sxm", tp=2, prompt_len=16, output_len=8, dtype="bfloat16")
    assert modelled.model == "tiny" and modelled.dtype == "bf16"


def test_both_spellings_of_a_precision_are_one_precision():
    assert precision("bfloat16") == precision("bf16") == precision("torch.bfloat16") == "bf16"
    assert torch_name("bf16") == torch_name("bfloat16") == "bfloat16" and torch_name("fp32") == "float32"
    assert BenchSpec(dtype="bf16").dtype == BenchSpec(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"unknown dtype 'fp4'; choose one of fp32 \(float32\), bf16 \(bfloat16\)"):
        precision("fp4", ("fp32", "bf16", "fp16"))


def test_plan_takes_both_spellings(capsys):
    args = ["plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--tp", "8"]
    outputs = []
    for spelled in ("bf16", "bfloat16"):
        assert main([*args, "--dtype", spelled, "--kv-dtype", spelled]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "bf16" in outputs[0]


def test_generate_reads_config_json_once_and_takes_both_spellings(tmp_path, capsys, monkeypatch):
    path, _ = make_checkpoint("llama", tmp_path / "ckpt", seed=2)
    reads = []
    original = ModelConfig.from_file.__func__
    monkeypatch.setattr(ModelConfig, "from_file", classmethod(lambda cls, *a, **k: reads.append(a) or
                                                               original(cls, *a, **k)))
    tokens = []
    for spelled in ("bf16", "bfloat16"):
        reads.clear()
        code = main(["generate", "--model", str(path), "--tp", "2", "--prompt-ids", "1,5,9", "--prompt-ids", "3,4",
                     "--max-new-tokens", "3", "--dtype", spelled, "--json"])
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and len(reads) == 1, reads  # the command read it; both thread ranks got the ModelConfig
        tokens.append(report["tokens"])
    assert tokens[0] == tokens[1]


def test_every_step_of_the_runner_is_the_model_forward_pass():
    hf = build_hf_model("mistral", seed=4)
    prompts = torch.tensor(distinct_prompts(hf.config.vocab_size, [6, 6], seed=4))

    def rank(dist):
        model = from_hf_model(hf, dist)
        eager, fixed = ModelRunner(model, "eager"), ModelRunner(model, "static")
        eager.start(2, 8)
        first = eager.prefill(prompts)
        token = model.greedy(first)[:, None]
        step = eager.decode(token, 6)
        whole = model(torch.cat([prompts, token], 1))[:, -1]
        fixed.start(2, 8)
        fixed.prefill(prompts)
        return first, step, whole, fixed.decode(token, 6)

    for first, step, whole, fixed in launch(rank, 2, "threads"):
        torch.testing.assert_close(step, whole, rtol=0, atol=1e-5)
        torch.testing.assert_close(fixed, step, rtol=0, atol=1e-5)


def test_only_the_decoder_walks_its_layers():
    """No second copy of the forward pass: nothing outside model/decoder.py embeds tokens or walks the layers."""
    walkers = re.compile(r"for .* in .*\.layers\b|\.embed\(")
    outside = [f"{p.relative_to(PACKAGE)}:{n}" for p in PACKAGE.rglob("*.py") if p.name != "decoder.py"
               for n, line in enumerate(p.read_text().splitlines(), 1)
               if walkers.search(line) and not line.lstrip().startswith(("#", '"', "*"))]
    assert outside == []
