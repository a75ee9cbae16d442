"""Prepacked linears (oneDNN's blocked layout): the same model, the same tokens, the same bytes, a faster kernel."""
import pytest
import torch

from tplab import launch
from tplab.engine.generate import generate
from tplab.errors import InputError
from tplab.layers.weights import prepack_supported
from tplab.model.loading import from_pretrained
from tplab.specs.tiny import TINY_DIR

pytestmark = pytest.mark.skipif(not prepack_supported(torch.ones(1)), reason="this torch build has no oneDNN")
PROMPTS = [[5, 9, 31, 7, 2, 11], [40, 41], [100, 7, 7, 8, 300, 12, 14, 15, 16]]


def eager_and_prepacked(dist, dtype: str, quant: str | None = None) -> dict:
    eager = from_pretrained(TINY_DIR, dist, dtype=dtype, quant=quant)
    packed = from_pretrained(TINY_DIR, dist, dtype=dtype, quant=quant, prepack=True)
    ids = torch.tensor([PROMPTS[2]])
    return {"tokens": [generate(m, PROMPTS, 12, eos_token_ids=()).tokens for m in (eager, packed)],
            "logits": [m.logits(m(ids))[0] for m in (eager, packed)],
            "bytes": [m.parameter_bytes() for m in (eager, packed)],
            "packed": sum(getattr(m, "packed", None) is not None for m in packed.modules())}


@pytest.mark.parametrize("tp,dtype", [(1, "float32"), (2, "float32"), (2, "bfloat16")])
def test_prepacked_linears_give_the_same_tokens_and_bytes(tp, dtype):
    for rank in launch(eager_and_prepacked, tp, "threads", args=(dtype,)):
        assert rank["tokens"][0] == rank["tokens"][1]
        assert rank["packed"] == 4 * 4 + 1  # q/k/v, o, gate/up, down in each of 4 layers, and the LM head
        assert rank["bytes"][0] == rank["bytes"][1]
        eager, packed = rank["logits"]
        tol = 1e-4 if dtype == "float32" else 0.1
        torch.testing.assert_close(packed.float(), eager.float(), atol=tol, rtol=0)


def test_quantized_linears_stay_as_they_are():
    rank = launch(eager_and_prepacked, 1, "threads", args=("bfloat16", "int8"))[0]
    assert rank["packed"] == 1  # only the unquantized LM head is prepacked
    assert rank["tokens"][0] == rank["tokens"][1]


def test_prepack_refuses_what_it_cannot_hold():
    def program(dist):
        return from_pretrained(TINY_DIR, dist, dtype="float16", prepack=True)
    with pytest.raises(InputError, match="--prepack needs unquantized float32 or bfloat16"):
        launch(program, 1, "threads")
