"""Specs in data/: every GPU figure has a source, model configs match Hugging Face's own parameter counts."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tplab.perf.shapes import rank_params
from tplab.specs.efficiency import efficiency_provenance, load_efficiency
from tplab.specs.hardware import GPU_DIR, gpu_for_device, gpu_names, load_gpu, network_names
from tplab.specs.model import MODEL_DIR, ModelConfig, model_names, resolve_model

GPUS = ["a100-pcie-80gb", "a100-sxm-80gb", "h100-pcie", "h100-sxm", "h200", "l40s", "rtx-4090"]


def test_every_gpu_figure_has_a_value_and_a_source():
    assert gpu_names() == GPUS
    for name in GPUS:
        gpu = load_gpu(name)
        raw = json.loads((GPU_DIR / f"{name}.json").read_text())
        assert raw["datasheet"]["title"] and raw["datasheet"]["url"].startswith("https://")
        assert gpu.memory_gb > 0 and gpu.memory_bandwidth_gb_s > 0 and gpu.tflops("bf16") > 0
        assert set(gpu.sources) >= {"memory_gb", "memory_bandwidth_gb_s", "tflops_bf16", "tflops_int8"}
        assert all(len(text) > 20 for text in gpu.sources.values())
        for link in gpu.interconnects.values():
            assert link.bandwidth_gb_s > 0 and link.alpha_us > 0 and link.source
        if gpu.tflops("fp8") is not None:
            assert gpu.tflops("fp8") >= gpu.tflops("bf16")
        assert gpu.tflops("fp16") == gpu.tflops("bf16")


def test_published_figures_of_h100_sxm_and_a100_without_fp8():
    h100 = load_gpu("H100-SXM")  # names are case-insensitive
    assert (h100.memory_gb, h100.memory_bandwidth_gb_s, h100.tflops("bf16"), h100.tflops("fp8")) == (80, 3350, 989.5, 1979)
    assert h100.interconnects["nvlink"].bandwidth_gb_s == 450  # 900 GB/s published counts both directions
    assert h100.interconnects["nvlink"].max_gpus == 8
    for name in ("a100-sxm-80gb", "a100-pcie-80gb"):
        a100 = load_gpu(name)
        assert a100.tflops("fp8") is None and "fp8" not in a100.dense_tflops
        raw = json.loads((GPU_DIR / f"{name}.json").read_text())["dense_tflops"]["fp8"]
        assert raw["value"] is None and "absent" in raw["source"]
    assert set(load_gpu("l40s").interconnects) == {"pcie"} and set(load_gpu("rtx-4090").interconnects) == {"pcie"}


def test_links_pick_the_fastest_that_reaches_tp_and_unknown_names_list_the_known():
    a100 = load_gpu("a100-pcie-80gb")
    assert a100.link(None, 2).name == "nvlink" and a100.link(None, 4).name == "pcie"
    assert network_names() == ["ib-hdr-200", "ib-ndr-400"]
    ib = a100.link("ib-ndr-400")
    assert (ib.kind, ib.bandwidth_gb_s, ib.max_gpus) == ("network", 50, None)
    with pytest.raises(ValueError, match="unknown interconnect for a100-pcie-80gb 'infinity'; known: nvlink, pcie, ib-"):
        a100.link("infinity")
    with pytest.raises(ValueError, match="unknown GPU 'b200'; known: a100-pcie-80gb, .*rtx-4090"):
        load_gpu("b200")


def _hf_config(name: str):
    fields = json.loads((MODEL_DIR / f"{name}.json").read_text())
    fields.pop("_source")
    return AutoConfig.for_model(**fields)


def test_shipped_models_match_hugging_face_parameter_counts_exactly():
    assert model_names() == ["llama-2-13b", "llama-2-70b", "llama-2-7b", "llama-3-70b", "llama-3-8b", "llama-3.1-405b",
                             "llama-3.1-70b", "llama-3.1-8b", "llama-3.3-70b", "mistral-7b", "mixtral-8x22b",
                             "mixtral-8x7b", "qwen2-72b", "qwen3-235b-a22b", "qwen3-30b-a3b"]
    for name in model_names():
        with torch.device("meta"):  # shapes only, no memory
            hf = AutoModelForCausalLM.from_config(_hf_config(name))
        assert sum(rank_params(resolve_model(name), tp=1).values()) == sum(p.numel() for p in hf.parameters()), name
    spec = resolve_model("qwen2-72b")
    assert spec.qkv_bias and not resolve_model("llama-3-70b").qkv_bias
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (64, 8, 128, 152064)


@pytest.mark.parametrize("tied", [False, True])
def test_any_saved_config_json_loads_and_counts_like_hugging_face(tmp_path, tied):
    torch.manual_seed(0)
    small = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                 vocab_size=103, max_position_embeddings=128, tie_word_embeddings=tied)
    for cls, config in ((LlamaForCausalLM, LlamaConfig(**small)), (Qwen2ForCausalLM, Qwen2Config(**small))):
        hf = cls(config)
        folder = tmp_path / f"{config.model_type}-{tied}"
        hf.save_pretrained(folder)
        spec = resolve_model(folder)  # a folder holding config.json
        assert spec == resolve_model(folder / "config.json")
        assert sum(rank_params(spec, tp=1).values()) == sum(p.numel() for p in hf.parameters())
        assert (spec.tie_word_embeddings, spec.qkv_bias) == (tied, config.model_type == "qwen2")


def test_bad_model_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown model 'gpt-5'; known: llama-2-13b, .*; or pass the path"):
        resolve_model("gpt-5")
    with pytest.raises(ValueError, match="lacks hidden_size, intermediate_size"):
        ModelConfig.from_dict({"n_embd": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 50257},
                              strict=False)
    moe = json.loads((MODEL_DIR / "llama-3-8b.json").read_text()) | {"num_local_experts": 8}
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelConfig.from_dict(moe, strict=False)


def test_efficiency_defaults_have_provenance_and_accept_overrides(tmp_path):
    eff = load_efficiency()
    provenance = efficiency_provenance()
    assert set(provenance) == set(vars(eff)) and all(len(p) > 30 for p in provenance.values())
    assert load_efficiency({"memory_bandwidth": 0.5}).memory_bandwidth == 0.5
    assert load_efficiency({"memory_bandwidth": 0.5}).link == eff.link
    override = tmp_path / "measured.json"
    override.write_text(json.dumps({"compute": {"value": 0.45, "provenance": "measured"}, "link": 0.7}))
    from_file = load_efficiency(override)
    assert (from_file.compute, from_file.link, from_file.memory_bandwidth) == (0.45, 0.7, eff.memory_bandwidth)
    with pytest.raises(ValueError, match="unknown efficiency 'hbm'; known: memory_bandwidth, compute"):
        load_efficiency({"hbm": 0.9})
    with pytest.raises(ValueError, match=r"efficiency link=1.5 must be a fraction in \(0, 1\]"):
        load_efficiency({"link": 1.5})


def test_a_record_s_device_name_maps_to_one_gpu_spec():
    names = [n.lower() for gpu in gpu_names() for n in load_gpu(gpu).device_names]
    assert len(names) == len(set(names)) and all(load_gpu(gpu).device_names for gpu in gpu_names())
    assert gpu_for_device("NVIDIA H200") == "h200" and gpu_for_device("nvidia h100 80gb hbm3") == "h100-sxm"
    assert gpu_for_device("NVIDIA H100 PCIe") == "h100-pcie"
    assert gpu_for_device("NVIDIA H100 NVL") is None and gpu_for_device("Intel(R) Xeon(R) Processor") is None
