"""The compiled decode step (``ModelRunner(model, "compiled")``, ``generate --compile``): torch.compile of the static
step, the all-reduces one operator each inside the graph. The same greedy tokens as the eager loop, at tp 1 and 2, in
fp32 and bf16 (inductor keeps bf16's roundings: ``emulate_precision_casts``), the same collectives recorded, and no
graph break."""
import pytest

from tplab import launch
from tplab.engine.generate import generate
from tplab.engine.runner import ModelRunner
from tplab.model.loading import from_pretrained
from tplab.testing import distinct_prompts, make_checkpoint

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, hf = make_checkpoint("llama31", tmp_path_factory.mktemp("llama31"), seed=4)
    return path, distinct_prompts(hf.config.vocab_size, [5, 9, 3], seed=4)


def eager_and_compiled(dist, path, prompts, dtype):
    model = from_pretrained(str(path), dist, dtype=dtype)
    out = {}
    for mode in ("eager", "compiled"):
        result = generate(ModelRunner(model, mode), prompts, NEW_TOKENS, eos_token_ids=())
        out[mode] = result.tokens, {op: (s["count"], s["bytes"]) for op, s in result.comm["decode"].items()}
    return out


@pytest.mark.parametrize("tp,dtype", [(1, "float32"), (2, "float32"), (2, "bfloat16")])
def test_the_compiled_step_gives_the_eager_tokens_and_collectives_without_a_graph_break(checkpoint, tp, dtype):
    from torch._dynamo.utils import counters

    path, prompts = checkpoint
    counters.clear()
    for rank in launch(eager_and_compiled, tp, args=(path, prompts, dtype)):
        assert rank["compiled"] == rank["eager"]
    assert not counters["graph_break"]


def test_compile_is_refused_where_shapes_change(checkpoint, capsys):
    from tplab.cli import main

    path, _ = checkpoint
    assert main(["generate", "--model", str(path), "--pp", "2", "--compile", "--prompt-ids", "5,6,7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compile compiles one step of the whole model at fixed shapes" in err
