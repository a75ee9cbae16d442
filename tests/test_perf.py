"""The cost model: hand-calculated anchors, a KV cache checked against Hugging Face, monotonic properties, errors."""
import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tplab.perf.comm import ring_all_gather_seconds, ring_all_reduce_seconds
from tplab.perf.estimate import estimate, max_batch, min_tp, throughput_curve
from tplab.perf.pipeline import compare_tp_pp, estimate_pipeline
from tplab.perf.replicas import compare_replicas
from tplab.perf.shapes import padded_vocab, rank_params, scale_bytes, weight_bytes
from tplab.specs.efficiency import load_efficiency
from tplab.specs.hardware import gpu_names, load_gpu
from tplab.specs.model import ModelConfig, model_names, resolve_model

LLAMA3_70B = resolve_model("llama-3-70b")


def test_hand_calculated_anchors():
    h, inter, vocab, layers = 8192, 28672, 128256, 80
    per_layer = 2 * h * h + 2 * h * 1024 + 3 * h * inter + 2 * h  # q, o; k, v (8 heads of 128); gate, up, down; 2 norms
    params = 2 * vocab * h + layers * per_layer + h  # embedding, lm_head, final norm
    assert params == 70_553_706_496
    assert weight_bytes(LLAMA3_70B, 1, "bf16") == 2 * params  # ≈ 141 GB
    assert round(weight_bytes(LLAMA3_70B, 1, "bf16") / 1e9) == 141
    assert LLAMA3_70B.kv_bytes_per_token() == 327_680 == 2 * 80 * 8 * 128 * 2
    assert LLAMA3_70B.kv_bytes_per_token(tp=8) == 327_680 // 8
    assert LLAMA3_70B.kv_bytes_per_token(tp=16) == 327_680 // 8  # 8 KV heads: beyond tp=8 each rank keeps one
    assert LLAMA3_70B.kv_bytes_per_token(dtype="fp8") == 327_680 // 2
    # quantization shrinks only the decoder's linear layers; embedding, lm_head and norms stay 16-bit
    linear = rank_params(LLAMA3_70B, 1)["linear"]
    # ... to 1 byte, plus a 4-byte scale per output row: (64 + 2·8)·128 q/k/v rows, 2·28672 gate/up, 2·8192 o/down
    scales = scale_bytes(LLAMA3_70B, 1, "fp8")
    assert scales == 80 * ((64 + 2 * 8) * 128 + 2 * 28672 + 2 * 8192) * 4 == 26_869_760
    assert weight_bytes(LLAMA3_70B, 1, "bf16") - weight_bytes(LLAMA3_70B, 1, "fp8") == linear - scales


def test_kv_bytes_per_token_matches_a_hugging_face_cache():
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=3, vocab_size=101, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 101, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # the second prompt is 5 tokens, left-padded
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    spec = ModelConfig.from_dict(config.to_dict(), strict=False)
    assert cache_bytes == 2 * 9 * spec.kv_bytes_per_token(tp=1, dtype="bf16")


def test_sharding_rules_pad_the_vocabulary_replicate_kv_heads_and_reject_bad_tp():
    odd = ModelConfig.from_dict(dict(hidden_size=64, intermediate_size=96, num_attention_heads=24, num_key_value_heads=8,
                                 num_hidden_layers=2, vocab_size=32001), strict=False)
    assert padded_vocab(odd, 2) == 32002 and rank_params(odd, 2)["embedding"] == 16001 * 64
    assert odd.valid_tp() == [1, 2, 4, 8, 24]  # 3 and 6 split 24 heads but not 8 KV heads; 12 is no multiple of 8
    with pytest.raises(ValueError, match="num_attention_heads=24 is not divisible by tp=5; valid tp: 1, 2, 4, 8, 24$"):
        odd.check_tp(5)
    with pytest.raises(ValueError, match="num_key_value_heads=8 is not divisible by tp=3"):
        odd.check_tp(3)
    with pytest.raises(ValueError, match="tp=12 > num_key_value_heads=8 must be a multiple of 8"):
        odd.check_tp(12)
    # past 8 KV heads the k/v weights are replicated: tp=16 holds more than half of tp=8's share
    assert rank_params(LLAMA3_70B, 16)["linear"] > rank_params(LLAMA3_70B, 8)["linear"] / 2


def test_more_tp_never_raises_per_gpu_weight_memory():
    for name in model_names():
        spec = resolve_model(name)
        for dtype in ("bf16", "fp8", "int4"):
            per_gpu = [weight_bytes(spec, tp, dtype) for tp in spec.valid_tp()]
            assert per_gpu == sorted(per_gpu, reverse=True), (name, dtype)


def test_pcie_is_never_faster_than_nvlink():
    for gpu in gpu_names():
        hw = load_gpu(gpu)
        if "nvlink" not in hw.interconnects:
            continue
        for tp in LLAMA3_70B.valid_tp(hw.interconnects["nvlink"].max_gpus)[1:]:
            for batch in (1, 32):
                kw = dict(model=LLAMA3_70B, gpu=hw, tp=tp, batch=batch, prompt_len=2048, output_len=128)
                nvlink, pcie = estimate(interconnect="nvlink", **kw), estimate(interconnect="pcie", **kw)
                assert pcie.decode_ms_per_token > nvlink.decode_ms_per_token, (gpu, tp, batch)
                assert pcie.ttft_ms > nvlink.ttft_ms and pcie.throughput_tok_s < nvlink.throughput_tok_s


def test_larger_batch_never_lowers_throughput_before_memory_runs_out():
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    for gpu, tp, dtype in (("h100-sxm", 4, "bf16"), ("h100-sxm", 8, "bf16"), ("h200", 2, "fp8"), ("l40s", 8, "int4")):
        curve = [e for e in throughput_curve(batches, model=LLAMA3_70B, gpu=gpu, tp=tp, dtype=dtype, prompt_len=2048,
                                             output_len=256) if e.fits]
        assert len(curve) >= 3, (gpu, tp)
        rates = [e.throughput_tok_s for e in curve]
        assert rates == sorted(rates), (gpu, tp, dtype)


def test_breakdowns_add_up_and_the_bound_moves_from_memory_to_compute():
    small = estimate(model=LLAMA3_70B, gpu="h100-sxm", tp=8, batch=1)
    big = estimate(model=LLAMA3_70B, gpu="h100-sxm", tp=8, batch=512, prompt_len=512, output_len=128)
    for e in (small, big):
        assert math.isclose(sum(e.breakdown["decode_ms"].values()), e.decode_ms_per_token)
        assert math.isclose(sum(e.breakdown["ttft_ms"].values()), e.ttft_ms)
        assert math.isclose(sum(e.breakdown["memory_gb"].values()), e.memory_per_gpu_gb)
    assert small.bound == "memory" and small.breakdown["decode_ms"]["compute"] == 0
    assert big.bound == "compute" and big.breakdown["ttft_ms"]["compute"] > big.breakdown["ttft_ms"]["weights"]
    single = estimate(model=LLAMA3_70B, gpu="h200", tp=1, batch=1, dtype="fp8")
    assert single.breakdown["decode_ms"]["communication"] == 0


def test_communication_is_the_ring_model_of_comm_model():
    e = estimate(model=LLAMA3_70B, gpu="h100-sxm", tp=4, batch=8, prompt_len=1000, output_len=100)
    link, eff = load_gpu("h100-sxm").interconnects["nvlink"], load_efficiency()
    alpha, beta, base = link.alpha_us * 1e-6, link.bandwidth_gb_s * 1e9 * eff.link, eff.collective_base_us * 1e-6
    reduce = base + ring_all_reduce_seconds(8 * 8192 * 2, 4, alpha, beta)  # 8 tokens of h=8192 in bf16
    gather = base + ring_all_gather_seconds(8 * 128256 * 2, 4, alpha, beta)  # the logits
    assert math.isclose(e.breakdown["decode_ms"]["communication"], 1e3 * ((2 * 80 + 1) * reduce + gather))


def test_min_tp_max_batch_cost_and_efficiency_overrides():
    kw = dict(model="llama-3-70b", gpu="h100-sxm", batch=1, prompt_len=4096, output_len=256)
    tp = min_tp(**kw)
    smaller = [t for t in LLAMA3_70B.valid_tp() if t < tp]
    assert estimate(tp=tp, **kw).fits and not estimate(tp=smaller[-1], **kw).fits
    assert min_tp(**(kw | {"gpu": "h200"})) < tp  # 141 GB GPUs need fewer
    with pytest.raises(ValueError, match="does not fit on up to 8 x rtx-4090 over pcie"):
        min_tp(model="qwen2-72b", gpu="rtx-4090", batch=64, prompt_len=8192, output_len=256)
    most = max_batch(model="llama-3-70b", gpu="h100-sxm", tp=8, prompt_len=4096, output_len=256)
    assert estimate(tp=8, **(kw | {"batch": most})).fits and not estimate(tp=8, **(kw | {"batch": most + 1})).fits
    assert max_batch(model="llama-3-70b", gpu="h100-sxm", tp=1) == 0
    priced = estimate(tp=8, price_per_gpu_hour=2.5, **kw)
    assert math.isclose(priced.cost_per_million_tokens, 2.5 * 8 / 3600 / priced.throughput_tok_s * 1e6)
    assert estimate(tp=8, **kw).cost_per_million_tokens is None
    slow = estimate(tp=8, efficiency={"memory_bandwidth": 0.4}, **kw)
    scale = load_efficiency().memory_bandwidth / 0.4  # bytes over the achieved bandwidth
    assert math.isclose(slow.breakdown["decode_ms"]["weights"], scale * priced.breakdown["decode_ms"]["weights"])


def test_fp8_falls_back_to_weight_only_on_a100_and_runs_fp8_math_on_h100():
    a100 = estimate(model=LLAMA3_70B, gpu="a100-sxm-80gb", tp=4, dtype="fp8", batch=64)
    h100 = estimate(model=LLAMA3_70B, gpu="h100-sxm", tp=4, dtype="fp8", batch=64)
    assert a100.compute_dtype == "bf16" and "W8A16" in a100.notes[0]
    assert h100.compute_dtype == "fp8" and h100.notes == ()
    assert estimate(model=LLAMA3_70B, gpu="h100-sxm", tp=4, dtype="int4").compute_dtype == "bf16"  # W4A16


def test_bad_inputs_raise_clear_errors():
    kw = dict(model="llama-3-70b", gpu="h100-sxm", tp=8)
    cases = [({"batch": 0}, "batch must be a positive integer"), ({"prompt_len": -1}, "prompt_len must be"),
             ({"dtype": "fp4"}, "unknown weight dtype 'fp4'; known: bf16, fp16, fp8, int8, int4"),
             ({"kv_dtype": "int4"}, "unknown kv_dtype 'int4'"), ({"tp": 3}, "valid tp: 1, 2, 4, 8, 16, 32, 64"),
             ({"prompt_len": 8000, "output_len": 500}, "exceeds llama-3-70b's max_position_embeddings=8192"),
             ({"price_per_gpu_hour": -1.0}, "price_per_gpu_hour must be >= 0"),
             ({"tp": 16}, "nvlink on h100-sxm joins at most 8 GPUs.*ib-ndr-400"),
             ({"gpu": "a100-pcie-80gb", "tp": 4, "interconnect": "nvlink"}, "joins at most 2 GPUs.*interconnect='pcie'")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            estimate(**(kw | change))
    assert estimate(**(kw | {"tp": 16, "interconnect": "ib-ndr-400"})).interconnect == "ib-ndr-400"


def test_pipeline_bubble_memory_and_reduction_to_plain_tp():
    kw = dict(model=LLAMA3_70B, gpu="h100-sxm", batch=8, prompt_len=2048, output_len=128)
    plain, one_stage = estimate(tp=8, **kw), estimate_pipeline(tp=8, pp=1, micro_batches=1, **kw)
    assert math.isclose(one_stage.decode_ms_per_token, plain.decode_ms_per_token)
    assert math.isclose(one_stage.stage_memory_gb, plain.memory_per_gpu_gb) and one_stage.bubble_fraction == 0
    tp_all, pipes = compare_tp_pp(gpus_per_node=8, nodes=2, micro_batches=[1, 2, 4, 8], **kw)
    assert tp_all.tp == 16 and tp_all.interconnect == "ib-ndr-400"
    one, two = pipes[0], pipes[1]
    assert one.bubble_fraction >= 0.5 - 1e-9  # m=1: each of the 2 stages idles while the other works
    assert two.bubble_fraction < one.bubble_fraction and two.throughput_tok_s > one.throughput_tok_s
    assert all(p.stage_memory_gb < plain.memory_per_gpu_gb for p in pipes)
    with pytest.raises(ValueError, match="micro_batches must be between 1 and batch=8"):
        estimate_pipeline(tp=8, pp=2, micro_batches=9, **kw)
    with pytest.raises(ValueError, match="pp must be a positive integer, got 0"):
        estimate_pipeline(tp=8, pp=0, micro_batches=1, **kw)
    with pytest.raises(ValueError, match="pp=81 is more than the model's 80 decoder layers.*valid pp: 1 to 80"):
        estimate_pipeline(tp=8, pp=81, micro_batches=1, **kw)


def test_replicas_split_the_load_and_pay_for_every_gpu():
    kw = dict(model=LLAMA3_70B, gpu="h100-sxm", prompt_len=2048, output_len=256, price_per_gpu_hour=2.0)
    one_request = compare_replicas(gpus=8, options=[(8, "bf16"), (4, "fp8")], concurrency=1, **kw)
    for option in one_request:  # one request keeps one replica busy; the others idle but are paid for
        assert math.isclose(option.throughput_tok_s, option.estimate.throughput_tok_s)
        assert math.isclose(option.cost_per_million_tokens, 2.0 * 8 / 3600 / option.throughput_tok_s * 1e6)
    busy = compare_replicas(gpus=8, options=[(4, "fp8")], concurrency=32, **kw)[0]
    assert (busy.replicas, busy.batch_per_replica, busy.label) == (2, 16, "2 x TP4 fp8")
    assert math.isclose(busy.throughput_tok_s, 2 * busy.estimate.throughput_tok_s)
    with pytest.raises(ValueError, match="option TP16 bf16 needs 16 GPUs but only gpus=8"):
        compare_replicas(gpus=8, options=[(16, "bf16")], concurrency=4, **kw)


def test_estimate_is_a_frozen_record_with_a_modelled_summary():
    e = estimate(model="llama-3-8b", gpu="l40s", tp=2, batch=4)
    assert e.summary().startswith("[modelled (not measured)] llama-3-8b on 2 x l40s over pcie")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.tp = 4
