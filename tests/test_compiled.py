"""The compiled decode step (``ModelRunner(model, "compiled")``, ``generate --compile``): torch.compile of the static
step, the weights frozen into it, the all-reduces one operator each inside the graph. The same greedy tokens as the
eager loop, at tp 1 and 2, in fp32 and bf16 (inductor keeps bf16's roundings: ``emulate_precision_casts``), the same
collectives recorded, and no graph break; its attention of one query per row (generated sums, not torch's
attention kernel) equals the kernel's. The autotuned step (its own GEMM kernels) gives the eager tokens and logits
within fp32 tolerance, and in bf16 within bf16's. On a CPU without AVX-512 inductor's C++ GEMMs read the bf16 weights
and compute in float32; where the libraries are capped at AVX2 below the CPU, bf16 weights are frozen unpacked, and
nothing fails."""
import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

from tplab import launch
from tplab.engine.generate import generate
from tplab.engine.runner import ModelRunner, compile_note, compile_options, generated_modules
from tplab.model.attention import attention_mask, grouped_query_attention
from tplab.model.loading import from_pretrained
from tplab.testing import distinct_prompts, make_checkpoint

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, hf = make_checkpoint("llama31", tmp_path_factory.mktemp("llama31"), seed=4)
    return path, distinct_prompts(hf.config.vocab_size, [5, 9, 3], seed=4)


def frozen_copies(model, modules) -> list[weakref.ref]:
    """Weak references to the tensors of this rank's generated ``modules`` (those holding some of ``model``'s own
    tensors as constants) that are not ``model``'s own: the copies its compiled graph froze (e.g. prepacked)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    copies = []
    for module in modules:
        tensors = [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        aliased = [not t.is_mkldnn and t.untyped_storage().data_ptr() in own for t in tensors]
        if any(aliased):
            copies += [weakref.ref(t) for t, alias in zip(tensors, aliased) if not alias]
    return copies


def eager_and_compiled(dist, path, prompts, dtype, first_module=0):
    """Each mode's tokens and decode collectives; then the compiled runner on fewer rows (a new shape, compiled
    anew) against eager on those rows; and how many frozen copies of the weights the first shape's graph made
    (tensors of this rank's modules generated from ``first_module`` on that are not its model's own, e.g.
    prepacked ones), and how many are alive while the runner decodes the second shape."""
    model = from_pretrained(str(path), dist, dtype=dtype)
    out, runners = {}, {}
    for mode in ("eager", "compiled"):
        runners[mode] = ModelRunner(model, mode)
        result = generate(runners[mode], prompts, NEW_TOKENS, eos_token_ids=())
        out[mode] = result.tokens, {op: (s["count"], s["bytes"]) for op, s in result.comm["decode"].items()}
    frozen = frozen_copies(model, generated_modules()[first_module:])
    for mode, runner in runners.items():
        out[f"{mode}, two rows"] = generate(runner, prompts[:2], NEW_TOKENS, eos_token_ids=()).tokens
    gc.collect()
    out["first shape's frozen tensors"] = len(frozen), sum(ref() is not None for ref in frozen)
    return out


@pytest.mark.parametrize("tp,dtype", [(1, "float32"), (2, "float32"), (2, "bfloat16")])
def test_the_compiled_step_gives_the_eager_tokens_and_collectives_without_a_graph_break(checkpoint, tp, dtype):
    """Every rank compiles both shapes, though dynamo would run the ninth graph of one code object eagerly (the
    limit set to 1 here: the second graph of a shared code object would run eagerly, with the same tokens)."""
    from torch._dynamo.utils import counters

    path, prompts = checkpoint
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1):
        ranks = launch(eager_and_compiled, tp, args=(path, prompts, dtype, len(generated_modules())))
    for rank in ranks:
        assert rank["compiled"] == rank["eager"]
        assert rank["compiled, two rows"] == rank["eager, two rows"]
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2 * tp, "one graph per rank and shape, none run eagerly"
    for rank in ranks:  # float32 weights are prepacked (copies); bf16 ones where the CPU's oneDNN can reorder them
        made, alive = rank["first shape's frozen tensors"]
        assert alive == 0 and (made > 0 or dtype != "float32"), "the first shape's frozen copies freed at the second"


def test_compile_is_refused_where_shapes_change(checkpoint, capsys):
    from tplab.cli import main

    path, _ = checkpoint
    assert main(["generate", "--model", str(path), "--pp", "2", "--compile", "--prompt-ids", "5,6,7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compile compiles one step of the whole model at fixed shapes" in err


def eager_and_autotuned_logits(dist, path, prompts, dtype):
    model = from_pretrained(str(path), dist, dtype=dtype)
    return {mode: generate(ModelRunner(model, mode), prompts, NEW_TOKENS, eos_token_ids=(), keep_logits=True)
            for mode in ("eager", "autotuned")}


@pytest.mark.parametrize("tp,dtype,tolerance", [(2, "float32", 1e-4), (1, "bfloat16", 4 * 2 ** -7)])
def test_the_autotuned_step_gives_the_eager_tokens_and_logits(checkpoint, tp, dtype, tolerance):
    """In bf16 on a CPU without AVX-512 the autotuned GEMMs convert the weights to float32 and round once, as
    eager's do, but sum in another order, and which kernel autotuning keeps depends on its timings: every logit
    within ``tolerance`` times the step's largest one (bf16: 4 epsilons, about 4 units in that logit's last place;
    seen on this CPU: up to 2.25 units, 0.070 for a largest logit of 4.16)."""
    path, prompts = checkpoint
    rank = launch(eager_and_autotuned_logits, tp, args=(path, prompts, dtype))[0]
    assert rank["autotuned"].tokens == rank["eager"].tokens
    for tuned, eager in zip(rank["autotuned"].logits, rank["eager"].logits):
        largest = eager.float().abs().max().item()
        torch.testing.assert_close(tuned.float(), eager.float(), rtol=0, atol=tolerance * largest)


@pytest.mark.parametrize("groups,masked", [(1, True), (4, True), (4, False)])
def test_a_compiled_steps_attention_of_one_query_equals_the_library_kernels(groups, masked, monkeypatch):
    """One query per row in a compiled CPU step goes through decode_attention's fused sums (torch's attention kernel
    is not called): the same output as that kernel over K, V copied per query head (eager), every row its own left
    padding."""
    batch, kv_heads, slots, head_dim = 3, 2, 9, 8
    gen = torch.Generator().manual_seed(groups)
    q = torch.randn(batch, kv_heads * groups, 1, head_dim, generator=gen)
    keys, values = (torch.randn(batch, kv_heads, slots, head_dim, generator=gen) for _ in range(2))
    key_valid = torch.arange(slots)[None, :] >= torch.tensor([0, 3, 6])[:, None]
    mask = attention_mask(torch.tensor([slots - 1]), key_valid, window=None) if masked else None
    expected = F.scaled_dot_product_attention(q, keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1),
                                              attn_mask=mask, scale=head_dim ** -0.5)

    def library_kernel(*args, **kwargs):
        raise AssertionError("the compiled step called torch's attention kernel")

    monkeypatch.setattr(F, "scaled_dot_product_attention", library_kernel)
    torch._dynamo.reset()
    compiled = torch.compile(grouped_query_attention, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(q, keys, values, mask, head_dim ** -0.5), expected, rtol=0, atol=1e-5)


def test_bf16_weights_are_left_to_inductor_where_onednn_cannot_reorder_them(monkeypatch):
    """An AVX2-only CPU: inductor packs no bf16 weight, so prepacking stays on and the autotuned step's GEMMs are its
    C++ kernels (bf16 weights, float32 compute). A CPU with AVX-512 whose oneDNN is capped at AVX2: inductor would
    pack by the CPU's flags and the capped oneDNN could not reorder, so prepacking is off."""
    from tplab.specs import cpu
    cpu_device = torch.device("cpu")
    monkeypatch.setenv("TPLAB_CPU_FLAGS_OFF", "avx512bw,avx_ne_convert")
    assert "cpp.weight_prepack" not in compile_options(torch.bfloat16, cpu_device, autotune=True)
    assert "computing in float32" in compile_note(torch.bfloat16, cpu_device, autotune=True)
    assert "not prepacked" in compile_note(torch.bfloat16, cpu_device)
    assert "cpp.weight_prepack" not in compile_options(torch.float32, cpu_device)
    monkeypatch.setenv("TPLAB_CPU_FLAGS_OFF", "")
    monkeypatch.setattr(cpu, "_cpuinfo_flags", lambda: frozenset({"avx2", "avx512bw", "avx512vl", "avx512dq"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert compile_options(torch.bfloat16, cpu_device, autotune=True)["cpp.weight_prepack"] is False
    assert "not prepacked" in compile_note(torch.bfloat16, cpu_device, autotune=True)


CAPPED_RUN = """
import json, sys, torch
from tplab import launch
from tplab.engine.generate import generate
from tplab.engine.runner import ModelRunner, compile_note, compiled_paged_attention
from tplab.model.attention import grouped_query_attention
from tplab.model.loading import from_pretrained

def eager_and_compiled(dist):
    model = from_pretrained(sys.argv[1], dist, dtype="bfloat16")
    return {mode: generate(ModelRunner(model, mode), json.loads(sys.argv[2]), int(sys.argv[3]), eos_token_ids=()).tokens
            for mode in ("eager", "compiled")}

def paged_kernel_error():  # the serving engine's compiled attention in bf16, against attention over gathered keys
    store_k, store_v = (torch.randn(64, 2, 16, dtype=torch.bfloat16) for _ in range(2))
    q, read = torch.randn(3, 8, 16, dtype=torch.bfloat16), torch.randperm(64)[:30].reshape(3, 10)
    valid = torch.ones(3, 10, dtype=torch.bool)
    with torch.no_grad():
        out = compiled_paged_attention()(q, store_k, store_v, read, valid, 0.25)
    keys, values = (s[read].permute(0, 2, 1, 3) for s in (store_k, store_v))
    expected = grouped_query_attention(q[:, :, None], keys, values, None, 0.25)[:, :, 0]
    return (out.float() - expected.float()).abs().max().item()

print(compile_note(torch.bfloat16, torch.device("cpu")), file=sys.stderr)
print(json.dumps({**launch(eager_and_compiled, 1)[0], "paged_kernel_error": paged_kernel_error()}))
"""


def test_compile_in_bf16_runs_on_a_cpu_capped_at_avx2(checkpoint, tmp_path):
    """The libraries capped at AVX2 as on an AVX2-only CPU: the bf16 weights are frozen unpacked, said in one line,
    and the compiled step gives the eager tokens (in a process of its own: the caps are read at start-up); the
    serving engine's compiled paged-attention kernel (inductor's AVX2 code) computes what attention does."""
    path, prompts = checkpoint
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "MKL_ENABLE_INSTRUCTIONS": "AVX2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, "-c", CAPPED_RUN, str(path), json.dumps(prompts), str(NEW_TOKENS)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "weights frozen, not prepacked" in done.stderr
    tokens = json.loads(done.stdout.splitlines()[-1])
    assert tokens["compiled"] == tokens["eager"]
    assert tokens["paged_kernel_error"] < 2e-2
