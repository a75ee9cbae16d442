"""Prepacked linears (oneDNN's blocked layout): the same model, the same tokens, the same bytes, a faster kernel;
refused in one line where the CPU cannot hold them (bfloat16 without AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
import subprocess
import sys

import pytest
import torch

from tplab import launch
from tplab.engine.generate import generate
from tplab.errors import InputError
from tplab.layers.weights import prepack_problem
from tplab.model.loading import from_pretrained
from tplab.specs import cpu
from tplab.specs.tiny import TINY_DIR

pytestmark = pytest.mark.skipif(prepack_problem(torch.float32) is not None, reason="this torch build has no oneDNN")
NO_BF16_PREPACK = "avx512bw,avx_ne_convert"  # what tplab's capability check removes to take an AVX2 CPU's side
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
    if dtype == "bfloat16" and not cpu.bf16_prepack():
        pytest.skip(f"this CPU cannot prepack bfloat16 ({cpu.describe()}): the refusal is tested below")
    for rank in launch(eager_and_prepacked, tp, "threads", args=(dtype,)):
        assert rank["tokens"][0] == rank["tokens"][1]
        assert rank["packed"] == 4 * 4 + 1  # q/k/v, o, gate/up, down in each of 4 layers, and the LM head
        assert rank["bytes"][0] == rank["bytes"][1]
        eager, packed = rank["logits"]
        tol = 1e-4 if dtype == "float32" else 0.1
        torch.testing.assert_close(packed.float(), eager.float(), atol=tol, rtol=0)


def test_quantized_linears_stay_as_they_are():
    if not cpu.bf16_prepack():
        pytest.skip(f"this CPU cannot prepack the bfloat16 LM head ({cpu.describe()}): the refusal is tested below")
    rank = launch(eager_and_prepacked, 1, "threads", args=("bfloat16", "int8"))[0]
    assert rank["packed"] == 1  # only the unquantized LM head is prepacked
    assert rank["tokens"][0] == rank["tokens"][1]


def test_prepack_refuses_what_it_cannot_hold():
    def program(dist):
        return from_pretrained(TINY_DIR, dist, dtype="float16", prepack=True)
    with pytest.raises(InputError, match="--prepack needs unquantized float32 or bfloat16"):
        launch(program, 1, "threads")


def test_bf16_prepacking_is_refused_in_one_line_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setenv(cpu.FORCE_OFF, NO_BF16_PREPACK)
    assert not cpu.bf16_prepack() and prepack_problem(torch.float32) is None  # float32 prepacks on any x86 CPU
    with pytest.raises(InputError, match="--prepack in bfloat16 needs a CPU with AVX-512"):
        launch(lambda dist: from_pretrained(TINY_DIR, dist, dtype="bfloat16", prepack=True), 1, "threads")
    done = subprocess.run([sys.executable, "-m", "tplab", "generate", "--dtype", "bf16", "--prepack", "--prompt-ids",
                           "1,2,3", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1 and "use --dtype float32 with --prepack" in done.stderr


def test_libraries_capped_at_avx2_count_as_a_cpu_without_avx512(monkeypatch):
    for name in cpu.CAPS:
        monkeypatch.delenv(name, raising=False)
    assert cpu.capped_to_avx2() is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu.capped_to_avx2() == "ONEDNN_MAX_CPU_ISA=AVX2"
    assert not cpu.native_bf16() and not cpu.bf16_prepack() and "capped" in cpu.describe()
