import struct

import pytest

from magpie_local.gguf import GGUFError, read_gguf

from .gguf_writer import write_gguf


def test_reads_the_default_model(default_model):
    info = read_gguf(default_model)
    assert info.architecture == "llama"
    assert info.get("llama.block_count") == 30
    assert "<|im_start|>" in info.chat_template
    assert (info.bos_token, info.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert info.tensor_count > 0
    # The tokenizer's arrays are kept (the MLX conversion rebuilds the tokenizer from them).
    assert len(info.get("tokenizer.ggml.merges")) == 48900 and len(info.get("tokenizer.ggml.token_type")) == 49152


def test_tensor_infos_give_weight_types_and_size(default_model):
    """The shipped file is mostly Q4_1 (ggml type 3) with a Q8_0 (8) embedding and F32 (0) norms:
    210, 1 and 61 tensors of 134,515,008 weights, as the `gguf` package's reader counts them."""
    info = read_gguf(default_model, tensors=True)
    assert info.tensor_types == {3: 210, 8: 1, 0: 61}
    assert sum(info.tensor_types.values()) == info.tensor_count
    assert info.n_params == 134_515_008
    assert read_gguf(default_model).tensor_types == {}  # only when asked


@pytest.mark.parametrize("tensor,message", [
    (b"", "truncated"),
    (struct.pack("<Q", 1) + b"t" + struct.pack("<I", 1000), "dimensions"),
    (struct.pack("<Q", 1) + b"t" + struct.pack("<IQ", 1, 576), "truncated"),
])
def test_hostile_tensor_infos_fail_cleanly(tmp_path, tensor, message):
    path = tmp_path / "t.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + tensor)
    assert read_gguf(path).tensor_count == 1  # metadata alone still reads
    with pytest.raises(GGUFError, match=message):
        read_gguf(path, tensors=True)


def test_other_large_arrays_are_skipped(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama", "big": ["x"] * 5000, "small": ["y"]})
    info = read_gguf(path)
    assert info.get("big") == {"type": 8, "count": 5000} and info.get("small") == ["y"]


def test_round_trip_of_written_metadata(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama", "n": 3, "flag": True,
                                            "tokenizer.ggml.tokens": ["<s>", "</s>"],
                                            "tokenizer.ggml.bos_token_id": 0})
    info = read_gguf(path)
    assert info.metadata["n"] == 3 and info.metadata["flag"] is True
    assert info.bos_token == "<s>" and info.eos_token == ""
    assert info.chat_template is None


@pytest.mark.parametrize("content,message", [
    (b"", "not a GGUF file"),
    (b"hello world, not a model", "not a GGUF file"),
    (b"GGUF" + struct.pack("<I", 99), "unsupported GGUF version"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1), "truncated"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**60), "exceeds"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 10**9), "metadata entries"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77), "unknown value"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2) + b"\xff\xfe", "UTF-8"),
])
def test_corrupt_files_fail_cleanly(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message):
        read_gguf(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="directory"):
        read_gguf(tmp_path)
