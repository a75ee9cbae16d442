"""Loading: each rank reads only its slices (bytes counted, peak memory measured), same result on every path."""
import os
import shutil

import pytest
import torch
from probes import load_memory_probe
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tplab import launch
from tplab.errors import CheckpointError
from tplab.model.loading import from_hf_model, from_pretrained
from tplab.specs.model import ModelConfig
from tplab.testing import make_checkpoint, write_random_checkpoint

MB = 1 << 20


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    single, hf = make_checkpoint("llama31", root / "single", seed=4)
    sharded, _ = make_checkpoint("llama31", root / "sharded", seed=4, max_shard_size="40KB")
    mha, _ = make_checkpoint("llama", root / "mha", seed=4)
    return {"single": single, "sharded": sharded, "mha": mha, "hf": hf}


def file_bytes(path) -> int:
    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    return total


def expected_rank_bytes(config: ModelConfig, tp: int, rank: int) -> int:
    """fp32 bytes of rank's slices, written out from the TP layout (not from the loader's code)."""
    h, hd, heads, kv, inter, vocab = (config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads,
                                      config.intermediate_size, config.vocab_size)
    rows_per_rank = -(-vocab // tp)
    vocab_rows = min(vocab, (rank + 1) * rows_per_rank) - min(vocab, rank * rows_per_rank)
    local_kv = kv // tp if tp <= kv else 1
    layer = (heads // tp) * hd * h + 2 * local_kv * hd * h + h * heads * hd // tp + 3 * (inter // tp) * h + 2 * h
    return 4 * (vocab_rows * h * (1 if config.tie_word_embeddings else 2) + config.num_layers * layer + h)


def loaded_state(dist, path):
    model = from_pretrained(path, dist)
    return {k: v.clone() for k, v in model.state_dict().items()}, model.load_stats.bytes_read


def test_each_rank_reads_exactly_its_slices(checkpoints):
    for name in ("single", "mha"):
        path = checkpoints[name]
        config = ModelConfig.from_file(path)
        for tp in (1, 2, 4, 8):
            read = [r[1] for r in launch(loaded_state, tp, "threads", args=(path,))]
            assert read == [expected_rank_bytes(config, tp, r) for r in range(tp)]
            if name == "mha":  # tp <= KV heads, untied, vocab divisible: only the norms are read by every rank
                norms = 4 * config.hidden_size * (2 * config.num_layers + 1)
                assert sum(read) == file_bytes(path) + (tp - 1) * norms
    assert expected_rank_bytes(config, 1, 0) == file_bytes(checkpoints["mha"])


def test_sharded_checkpoint_single_file_and_in_memory_model_load_the_same_shards(checkpoints):
    assert (checkpoints["sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(checkpoints["sharded"].glob("*.safetensors"))) > 3
    hf = checkpoints["hf"]

    def rank(dist):
        from_memory = from_hf_model(hf, dist)
        return loaded_state(dist, checkpoints["single"])[0], loaded_state(dist, checkpoints["sharded"])[0], \
            from_memory.state_dict(), from_memory.load_stats.bytes_read

    for tp in (2, 8):
        for single, sharded, memory, memory_read in launch(rank, tp, "threads"):
            assert single.keys() == sharded.keys() == memory.keys()
            assert all(torch.equal(single[k], sharded[k]) and torch.equal(single[k], memory[k]) for k in single)
        assert memory_read == expected_rank_bytes(ModelConfig.from_file(checkpoints["single"]), tp, tp - 1)


def test_dtype_choice(checkpoints):
    def rank(dist):
        return (from_pretrained(checkpoints["single"], dist, dtype="bfloat16").lm_head.weight.dtype,
                from_pretrained(checkpoints["single"], dist).lm_head.weight.dtype)

    assert launch(rank, 2, "threads")[0] == (torch.bfloat16, torch.float32)


def test_errors_come_before_any_weight_is_read(checkpoints, tmp_path):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(checkpoints["single"] / "config.json", config_only)

    def attempt(dist, path):
        try:
            from_pretrained(path, dist)
        except (ValueError, FileNotFoundError) as e:
            return type(e).__name__, str(e)

    assert launch(attempt, 3, "threads", args=(config_only,))[0] == (
        "ValueError", "num_attention_heads=8 is not divisible by tp=3; valid tp: 1, 2, 4, 8")
    kind, message = launch(attempt, 2, "threads", args=(config_only,))[0]
    assert kind == "CheckpointError" and "no model.safetensors" in message
    kind, message = launch(attempt, 1, "threads", args=(tmp_path / "missing",))[0]
    assert kind == "FileNotFoundError" and "is not a directory" in message


def test_a_missing_tensor_is_named(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["single"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        launch(lambda dist: from_pretrained(broken, dist), 2, "threads")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_per_rank_is_about_one_tp_th(tmp_path):
    """~140 MB checkpoint; gloo processes measure their own peak RSS and private memory while loading."""
    path = write_random_checkpoint("llama", tmp_path / "big", hidden_size=512, intermediate_size=1536,
                                   num_hidden_layers=10, head_dim=64, num_key_value_heads=8, vocab_size=1024)
    size = os.path.getsize(path / "model.safetensors")
    assert 130 * MB < size < 150 * MB
    warmup = write_random_checkpoint("llama", tmp_path / "small", hidden_size=64, intermediate_size=192,
                                     num_hidden_layers=1, head_dim=16, num_key_value_heads=4, vocab_size=64)
    (one,) = launch(load_memory_probe, 1, "gloo", args=(str(path), str(warmup)))
    four = launch(load_memory_probe, 4, "gloo", args=(str(path), str(warmup)))
    print(f"\npeak RSS growth: tp=1 {one['peak_growth'] / MB:.1f} MiB, "
          f"tp=4 {[round(r['peak_growth'] / MB, 1) for r in four]} MiB; "
          f"private: tp=1 {one['anon_growth'] / MB:.1f}, tp=4 {[round(r['anon_growth'] / MB, 1) for r in four]} MiB")
    assert one["bytes_read"] == one["parameter_bytes"] > size - MB
    for rank in four:
        assert abs(rank["bytes_read"] - one["bytes_read"] / 4) < 0.01 * one["bytes_read"]
        assert rank["anon_growth"] < rank["bytes_read"] + 8 * MB  # private memory: the shards, nothing more
        assert rank["anon_growth"] < 0.3 * one["anon_growth"]
        # RSS also grows by file-backed pages: briefly, the checkpoint pages of the one tensor being sliced (~3 MiB);
        # library code run for the first time is made resident by the warm-up load
        assert rank["peak_growth"] < rank["bytes_read"] + 24 * MB
        assert rank["peak_growth"] < 0.4 * one["peak_growth"]
