"""Weight-only int8 and fp8 split over TP ranks: scales that shard with their weights and never depend on tp,
tokens identical at every tp, half the bytes of 16-bit linears, and the quality and generate commands."""
import json
from pathlib import Path

import pytest
import torch

from tplab import launch
from tplab.cli import main
from tplab.engine.generate import generate_rank_program
from tplab.layers.weights import Q_MAX, dequantize, quantize_rows
from tplab.model.loading import from_hf_model, from_pretrained
from tplab.specs.tiny import TINY_DIR
from tplab.testing import build_hf_model, distinct_prompts

LINEARS = ("attn.qkv", "attn.o_proj", "mlp.gate_up", "mlp.down")


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_rows_round_trip_within_half_a_step(scheme):
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitudes
    q, scale = quantize_rows(w, scheme)
    assert q.dtype == (torch.int8 if scheme == "int8" else torch.float8_e4m3fn)
    assert torch.allclose(scale, w.abs().amax(1) / Q_MAX[scheme])
    err = (dequantize(q, scale, torch.float32) - w).abs()
    if scheme == "int8":  # a uniform grid of step s: round to nearest is within s/2
        assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()
    else:  # e4m3 keeps 3 mantissa bits: within 2^-4 of each value, or of the smallest normal step
        assert (err <= torch.maximum(w.abs() / 16, scale[:, None] * 2 ** -9) * (1 + 1e-6)).all()


def _dequantized_layers(hf, scheme):
    """Per tp: every quantized linear of layer 0 dequantized and gathered from the ranks into the full weight."""
    def rank(dist):
        model = from_hf_model(hf, dist).quantize_(scheme)
        layer = model.layers[0]
        parts = {name: dequantize(m.weight.qweight, m.weight.scale, torch.float32)
                 for name, m in (("qkv", layer.attn.qkv), ("o", layer.attn.o_proj),
                                 ("gate_up", layer.mlp.gate_up), ("down", layer.mlp.down))}
        gathers = model.dist.stats.counts("quantize")
        return parts, gathers, len(model.layers)
    return {tp: launch(rank, tp, "threads") for tp in (1, 2, 4)}


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_scales_shard_with_their_weights_and_do_not_depend_on_tp(scheme):
    hf = build_hf_model("llama31", seed=5)  # 8 query heads, 2 KV heads: tp 4 replicates each KV head twice
    runs = _dequantized_layers(hf, scheme)
    full = runs[1][0][0]
    for tp, ranks in runs.items():
        down = torch.cat([r[0]["down"] for r in ranks], dim=1)  # row-parallel: columns split
        o = torch.cat([r[0]["o"] for r in ranks], dim=1)
        gate_up = [torch.cat([r[0]["gate_up"].chunk(2)[i] for r in ranks]) for i in (0, 1)]
        assert torch.equal(down, full["down"]) and torch.equal(o, full["o"])  # elementwise: same bits at any tp
        assert torch.equal(torch.cat(gate_up), full["gate_up"])
        for r in ranks:  # one all_gather of the row maxima per row-parallel layer, at load
            assert r[1] == {"all_gather": 2 * r[2]}
    q_rows = full["qkv"].shape[0] - 2 * 2 * 8  # 8 query heads of head_dim 8 above 2 KV heads of k and v
    for rank, r in enumerate(runs[4]):  # each rank's K rows are its (replicated) KV head's rows, scales included
        head = rank // 2
        assert torch.equal(r[0]["qkv"][16:24], full["qkv"][q_rows + 8 * head:q_rows + 8 * head + 8])


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_tokens_are_identical_at_every_tp_and_backend(scheme):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_DIR))
    prompts = [tokenizer(p).input_ids for p in ("The with statement", "An object is", "Exceptions are raised")]
    kwargs = dict(model=str(TINY_DIR), prompts=prompts, max_new_tokens=12, eos_token_ids=(), quant=scheme)
    tokens = {tp: launch(generate_rank_program, tp, "threads", kwargs=kwargs)[0].tokens for tp in (1, 2, 4, 8)}
    tokens["gloo"] = launch(generate_rank_program, 2, "gloo", kwargs=kwargs)[0].tokens
    assert all(t == tokens[1] for t in tokens.values())


def test_8_bit_linears_take_half_the_bytes_of_bf16_ones():
    def linear_bytes(model):
        buffers = [b for n, b in model.named_buffers() if n.endswith((".qweight", ".scale"))]
        weights = [p for n, p in model.named_parameters() if any(f".{k}." in n for k in LINEARS)]
        return sum(t.numel() * t.element_size() for t in [*buffers, *weights])

    def rank(dist):
        bf16 = from_pretrained("tiny", dist, dtype="bf16")
        return linear_bytes(bf16), linear_bytes(from_pretrained("tiny", dist, dtype="bf16", quant="int8")), \
            from_pretrained("tiny", dist, dtype="bf16", quant="fp8").parameter_bytes()

    for tp in (1, 2):
        for plain, quantized, _ in launch(rank, tp, "threads"):
            assert 0.5 < quantized / plain < 0.52  # 1 byte per weight, plus a 4-byte scale per row


def test_quality_reports_agreement_perplexity_kl_and_bytes(capsys):
    assert main(["quality", "--quant", "int8", "--tp", "2", "--windows", "3", "--max-new-tokens", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("token_agreement", "mean_first_divergence", "perplexity", "perplexity_reference", "kl_mean",
                "weight_bytes_per_rank"):
        assert key in report
    assert 0 <= report["token_agreement"] <= 1 and 0 < report["kl_mean"] < 0.01
    assert abs(report["perplexity"] / report["perplexity_reference"] - 1) < 0.01
    assert len(report["weight_bytes_per_rank"]) == 2 and report["weight_bytes_per_rank"][0] < \
        0.6 * report["weight_bytes_reference_per_rank"][0]


def test_bad_quality_input_is_one_line_and_exit_2(capsys, tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    for args, message in ((["--tp", "3"], "not divisible by tp=3"), (["--prompts", str(empty)], "holds no prompt"),
                          (["--windows", "0"], "must be positive integers")):
        assert main(["quality", "--quant", "fp8", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_generate_quant_reports_the_bytes(capsys):
    prompts = distinct_prompts(3072, [5, 3], seed=1)
    args = ["generate", "--tp", "1,2", "--quant", "fp8", "--max-new-tokens", "4", "--json",
            *[a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]]
    assert main(args) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert reports[0]["tokens"] == reports[1]["tokens"]
    assert reports[1]["weight_bytes"] < 0.6 * reports[0]["weight_bytes"]


@pytest.mark.parametrize("scheme", ["int8", "fp8", None])
def test_the_cost_model_counts_the_measured_bytes_of_each_rank_exactly(scheme):
    from tplab.perf.shapes import weight_bytes
    from tplab.specs.model import resolve_model

    config = resolve_model("tiny")
    for tp in (1, 2, 4, 8):
        measured = launch(lambda dist: from_pretrained("tiny", dist, dtype="bf16", quant=scheme).parameter_bytes(),
                          tp, "threads")
        assert set(measured) == {weight_bytes(config, tp, scheme or "bf16")}


def test_the_int8_kernel_path_matches_the_dequantized_weights_within_bf16_rounding():
    from tplab.layers.linear import ColumnParallelLinear

    linear = torch.nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    kernel = launch(lambda dist: ColumnParallelLinear.from_linear(linear, dist).quantize_("int8"), 1, "threads")[0]
    dense = torch.nn.functional.linear(x.float(), kernel.weight.dequantized(torch.float32),
                                       linear.bias.float())
    got = kernel(x).float()
    bound = 2 * 2 ** -8 * (x.float().abs() @ kernel.weight.dequantized(torch.float32).abs().T + 1)
    assert (got - dense).abs().le(bound).all()  # bf16 output and accumulation: a few units of 2^-8 relative


def _write_fp8_checkpoint(src: Path, dst: Path, per_tensor: bool) -> None:
    """The layout of common fp8 Hub checkpoints: each decoder linear's ``weight`` in e4m3 and a ``weight_scale``
    (per tensor, or one per output row as an (out, 1) tensor), and quantization_config in config.json."""
    import shutil

    from safetensors.torch import load_file, save_file
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith("proj.weight") and ".layers." in n]:
        w = tensors[name].float()
        if per_tensor:
            scale = w.abs().max() / 448.0
            q, scale = (w / scale).to(torch.float8_e4m3fn), scale.reshape(())
        else:
            q, scale = quantize_rows(w, "fp8")
            scale = scale[:, None]
        tensors[name], tensors[name.replace(".weight", ".weight_scale")] = q, scale
    save_file(tensors, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (dst / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_an_fp8_checkpoint_loads_as_it_is_on_every_tp(tmp_path, per_tensor):
    from tplab.testing import make_checkpoint
    path, hf = make_checkpoint("llama31", tmp_path / "bf16", seed=7)
    fp8 = tmp_path / "fp8"
    _write_fp8_checkpoint(path, fp8, per_tensor)
    prompts = distinct_prompts(hf.config.vocab_size, [6, 3, 5], seed=7)
    kwargs = dict(prompts=prompts, max_new_tokens=8, eos_token_ids=())
    stored = {tp: launch(generate_rank_program, tp, "threads", kwargs=dict(model=str(fp8), **kwargs))[0]
              for tp in (1, 2, 4)}
    assert all(r.tokens == stored[1].tokens for r in stored.values())
    for tp, r in stored.items():  # stored as the layout quantizing at load makes: e4m3 values, fp32 row scales
        assert r.weight_bytes == launch(lambda d: from_pretrained(str(path), d, quant="fp8").parameter_bytes(), tp,
                                        "threads")[0]
    if not per_tensor:  # the same per-row scales as quantizing the bf16 checkpoint at load: the same model
        requantized = launch(generate_rank_program, 2, "threads", kwargs=dict(model=str(path), quant="fp8", **kwargs))
        assert requantized[0].tokens == stored[1].tokens
    with pytest.raises(ValueError, match="is stored in fp8"):
        launch(lambda d: from_pretrained(str(fp8), d, quant="int8"), 1, "threads")


def test_an_unsupported_quantization_config_is_refused(tmp_path):
    from tplab.specs.model import ModelConfig
    from tplab.testing import hf_config
    fields = {**hf_config("llama").to_dict(), "quantization_config": {"quant_method": "gptq", "bits": 4}}
    with pytest.raises(ValueError, match="unsupported quantization_config \\(quant_method='gptq'\\)"):
        ModelConfig.from_dict(fields)


def test_bench_quant_times_the_quantized_shard_and_records_its_scheme(tmp_path):
    from tplab.bench import BenchSpec, run_bench
    from tplab.bench.records import record_shapes

    spec = BenchSpec(model="tiny", tps=[2], batches=[1], prompt_lens=[8], decode_steps=2, repeats=1, warmup=0,
                     baseline=False, quick_roofline=True, quant="fp8", dtype="bf16")
    record = run_bench(spec, out=tmp_path / "run.jsonl", progress=False)[0]
    assert record["setting"]["quant"] == "fp8" and record_shapes(record).dtype == "fp8"
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        BenchSpec(model="tiny", quant="int4")


@pytest.mark.parametrize("spec", ["llama31", "tied"])
def test_embeddings_quantize_when_asked_with_the_same_tokens_at_every_tp(tmp_path, spec, capsys):
    from tplab.testing import make_checkpoint
    path, hf = make_checkpoint(spec, tmp_path / spec, seed=3)
    prompts = distinct_prompts(hf.config.vocab_size, [5, 7], seed=3)
    kwargs = dict(model=str(path), prompts=prompts, max_new_tokens=6, eos_token_ids=(), quant="int8")
    plain = launch(generate_rank_program, 2, "threads", kwargs=kwargs)[0]
    both = {tp: launch(generate_rank_program, tp, "threads", kwargs={**kwargs, "quant_embeddings": True})[0]
            for tp in (1, 2, 4)}
    assert all(r.tokens == both[1].tokens for r in both.values())
    assert both[2].weight_bytes < plain.weight_bytes  # the vocabulary rows at 1 byte (+ a scale each) too
    assert main(["generate", "--model", str(path), "--prompt-ids", "1,2", "--quant-embeddings"]) == 2
    assert "--quant-embeddings goes with --quant" in capsys.readouterr().err
