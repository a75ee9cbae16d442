"""Score the public peer cost models, llm-analysis and GenZ, on the same published figures as tplab's.

    .venv/bin/python scripts/score_peers.py --force        # makes .venv-peers once, then scores

The peers cannot share tplab's environment: llm-analysis 0.2.2 requires huggingface-hub < 0.15, which
transformers (>= 4.45, tplab's requirement) excludes. So the first run makes `.venv-peers` with the two pinned
peers and nothing else, and runs this file again inside it (``--worker``), where it reads only JSON: the
figures of data/published, the model configs of data/model_configs, the GPU specs of data/hardware/gpus and the
fitted efficiencies of data/efficiency.json. It writes data/published/peer_scores.jsonl: one line per figure,
peer and setting ("defaults", or "tplab efficiencies" where the peer takes efficiencies), with the peer's
prediction or why it has none. Every value in it is modelled.

What each peer needed by hand is in HAND_WORK, and written into the file's first line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import venv
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
PEERS_VENV = ROOT / ".venv-peers"
PINS = ["llm-analysis==0.2.2", "genz-llm==0.0.16"]
OUT = DATA / "published" / "peer_scores.jsonl"
GENZ_MODELS = {"llama-2-7b": "meta-llama/Llama-2-7B", "llama-2-13b": "meta-llama/Llama-2-13B",
               "llama-3-8b": "meta-llama/Llama-3.1-8B", "mistral-7b": "mistralai/Mistral-7B",
               "llama-2-70b": "meta-llama/Llama-2-70B", "llama-3-70b": "meta-llama/Llama-3.1-70B"}
HAND_WORK = {
    "llm-analysis 0.2.2": [
        "no GPU config for H200 or L40S: built from tplab's GPU specs (data/hardware/gpus);",
        "no config for Llama-2-13B, Llama-3-8B or Mistral-7B: built from data/model_configs;",
        "no gated MLP: a SwiGLU MLP of width I is given as a two-matrix MLP of ffn_embed_dim ≈ 1.5·I (the same "
        "parameters and FLOPs), rounded to the nearest multiple of hidden_size because it refuses any other "
        "(16384 for Llama-2-7B's 16512, as its own config ships; 20480 for Llama-3-8B's 21504, 5% fewer MLP weights);",
        "defaults are 100% of peak for FLOPs, memory and links; FP8 is taken as its w8a8e16 dtype (INT8 peak).",
    ],
    "genz-llm 0.0.16": [
        "no system for H200 or L40S: given as a dict of tplab's GPU specs (dense BF16 TFLOP/s, memory, bandwidth, "
        "link);",
        "decode defaults to a beam width of 4 (Bb=4): scored at its default and at Bb=1, which the figures ran;",
        "Llama-3-8B is scored with its Llama-3.1-8B config (the same shapes); Llama-3-70B with its Llama-3.1-70B;",
        "defaults are 100% of peak; its one efficiency knob (system_eff) is set to tplab's fitted memory bandwidth, "
        "the roof decode runs against.",
    ],
}


def ensure_venv() -> Path:
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        venv.create(PEERS_VENV, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PINS], check=True)
    return python


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def gpu_numbers(name: str) -> dict:
    g = read(DATA / "hardware" / "gpus" / f"{name}.json")
    links = [v["bandwidth_gb_s"] for v in g["interconnects"].values()]
    fp8 = g["dense_tflops"].get("fp8", {}).get("value")
    return {"memory_gb": g["memory_gb"]["value"], "bandwidth": g["memory_bandwidth_gb_s"]["value"],
            "bf16": g["dense_tflops"]["bf16"]["value"], "fp8": fp8 or g["dense_tflops"]["bf16"]["value"],
            "link": max(links)}


def gated_as_ffn(m: dict) -> int:
    """llm-analysis's two-matrix MLP width for a SwiGLU MLP: the multiple of hidden_size nearest 1.5·I."""
    h = m["hidden_size"]
    return max(1, round(1.5 * m["intermediate_size"] / h)) * h


def llm_analysis_value(fig: dict, efficiencies: dict | None) -> float:
    from llm_analysis.analysis import LLMAnalysis
    from llm_analysis.config import GPUConfig, ModelConfig, ParallelismConfig, get_dtype_config_by_name

    m, g = read(DATA / "model_configs" / f"{fig['model']}.json"), gpu_numbers(fig["gpu"])
    model = ModelConfig(name=fig["model"], num_layers=m["num_hidden_layers"], n_head=m["num_attention_heads"],
                        hidden_dim=m["hidden_size"], vocab_size=m["vocab_size"], max_seq_len=m["max_position_embeddings"],
                        num_key_value_heads=m.get("num_key_value_heads"), ffn_embed_dim=gated_as_ffn(m),
                        model_type="llama")
    gpu = GPUConfig(name=fig["gpu"], mem_per_GPU_in_GB=g["memory_gb"], hbm_bandwidth_in_GB_per_sec=g["bandwidth"],
                    intra_node_bandwidth_in_GB_per_sec=g["link"], intra_node_min_message_latency=8e-6,
                    peak_fp16_TFLOPS=g["bf16"], peak_i8_TFLOPS=g["fp8"])
    dtype = get_dtype_config_by_name("w8a8e16" if fig["dtype"] == "fp8" else "w16a16e16")
    kw = {}
    if efficiencies:
        kw = dict(flops_efficiency=efficiencies["compute_fp8" if fig["dtype"] == "fp8" else "compute"],
                  hbm_memory_efficiency=efficiencies["memory_bandwidth"],
                  intra_node_memory_efficiency=efficiencies["link"])
    analysis = LLMAnalysis(model, gpu, dtype, ParallelismConfig(tp_size=fig["tp"], pp_size=1, sp_size=fig["tp"]), **kw)
    out = analysis.inference(batch_size_per_gpu=fig["batch"], seq_len=fig["prompt_len"],
                             num_tokens_to_generate=fig["output_len"], kv_cache_dtype_bytes=1 if fig["dtype"] == "fp8"
                             else 2)
    if fig["metric"] == "decode_ms_per_token":
        return 1e3 * out["decode_latency"]
    if fig["metric"] == "ttft_ms":
        return 1e3 * out["prefill_latency"]
    return fig["batch"] * fig["output_len"] / out["total_latency"]


def genz_value(fig: dict, beams: int, efficiency: float) -> float:
    from GenZ.LLM_inference import decode_moddeling, prefill_moddeling

    g = gpu_numbers(fig["gpu"])
    system = {"Flops": g["bf16"], "Memory_size": g["memory_gb"], "Memory_BW": g["bandwidth"], "ICN": g["link"],
              "real_values": True}
    common = dict(model=GENZ_MODELS[fig["model"]], batch_size=fig["batch"], input_tokens=fig["prompt_len"],
                  system_name=system, system_eff=efficiency, bits="fp8" if fig["dtype"] == "fp8" else "bf16",
                  tensor_parallel=fig["tp"])
    prefill = prefill_moddeling(**common)["Latency"]
    decode = decode_moddeling(**common, output_tokens=fig["output_len"], Bb=beams)["Latency"]
    if fig["metric"] == "decode_ms_per_token":
        return decode
    if fig["metric"] == "ttft_ms":
        return prefill
    return 1e3 * fig["batch"] * fig["output_len"] / (prefill + (fig["output_len"] - 1) * decode)


def worker(out: Path) -> None:
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)
    efficiencies = {k: v["value"] for k, v in read(DATA / "efficiency.json").items() if isinstance(v, dict)}
    figures = []
    for name in ("figures.jsonl", "held_out_70b.jsonl"):
        figures += [json.loads(line) for line in (DATA / "published" / name).read_text().splitlines() if line]
    settings = [("llm-analysis", "defaults", lambda f: llm_analysis_value(f, None)),
                ("llm-analysis", "tplab efficiencies", lambda f: llm_analysis_value(f, efficiencies)),
                ("genz", "defaults (beam width 4)", lambda f: genz_value(f, 4, 1.0)),
                ("genz", "beam width 1", lambda f: genz_value(f, 1, 1.0)),
                ("genz", "beam width 1, tplab memory efficiency", lambda f: genz_value(f, 1, efficiencies["memory_bandwidth"]))]
    lines = [json.dumps({"about": "peer predictions of data/published figures, all modelled", "hand_work": HAND_WORK})]
    for fig in figures:
        for peer, setting, fn in settings:
            row = {"figure": fig["id"], "peer": peer, "setting": setting}
            try:
                row["value"] = round(float(fn(fig)), 6)
            except Exception as e:  # a peer's own refusal (a model that does not fit its memory, ...) is data here
                row["value"], row["why_not"] = None, f"{type(e).__name__}: {str(e)[:160]}"
            lines.append(json.dumps(row))
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.worker:
        worker(out)
        return 0
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    subprocess.run([str(ensure_venv()), __file__, "--worker", "--out", str(out)], check=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
