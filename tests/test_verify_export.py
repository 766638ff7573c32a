"""llama.cpp reads the exports: control-vector files read by ggml's own GGUF reader as llama.cpp's loader
lays them out. ``steerstore verify-export`` on a real-model store is in test_integration.py (it shares
that store)."""

import importlib.util

import numpy as np
import pytest

from steerstore.infra.exports import ExportItem, encode_gguf
from steerstore.infra.reader import UserVectors
from steerstore.operators.llamacpp import load_control_vector

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama.cpp is not installed (make setup builds llama-cpp-python)")


def vectors(layers, recommended, hidden=6):
    data = (np.arange(len(layers) * hidden, dtype=np.float32).reshape(len(layers), hidden) - 7) / 5
    return UserVectors("eve", layers, data, recommended, 2.5, "response", "tiny", "fp", 3)


def write(tmp_path, item, name="cv.gguf"):
    path = tmp_path / name
    path.write_bytes(encode_gguf(item).files[".gguf"])
    return path


@needs_llama_cpp
def test_llama_cpp_reads_our_gguf_with_layer_i_in_row_i_minus_1_scaled(tmp_path):
    v = vectors([0, 2, 5], [2, 5])
    path = write(tmp_path, ExportItem(v, "caa", "pairs", "v1", "llama", layers="all"))
    n_embd, buffer, layers = load_control_vector(path, strength=1.5)
    assert n_embd == 6 and layers == [2, 5]  # layer 0 is left out: llama.cpp rejects direction.0
    assert buffer.shape == (5, 6)  # rows for layers 1..5
    np.testing.assert_allclose(buffer[1], 1.5 * v.vectors[1], rtol=1e-6)
    np.testing.assert_allclose(buffer[4], 1.5 * v.vectors[2], rtol=1e-6)
    assert not buffer[[0, 2, 3]].any()


@needs_llama_cpp
def test_llama_cpp_refuses_what_its_loader_refuses(tmp_path):
    import gguf

    def hand_written(name, tensors):
        path = tmp_path / name
        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", "llama")
        writer.add_int32("controlvector.layer_count", len(tensors))
        for tensor_name, data in tensors.items():
            writer.add_tensor(tensor_name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    ones = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="zero"):
        load_control_vector(hand_written("zero.gguf", {"direction.0": ones, "direction.1": ones}))
    with pytest.raises(ValueError, match="non-F32"):
        load_control_vector(hand_written("f16.gguf", {"direction.1": ones.astype(np.float16)}))
    with pytest.raises(ValueError, match="unparsable"):
        load_control_vector(hand_written("name.gguf", {"layer.1": ones}))
    with pytest.raises(ValueError, match="previous dimensions"):
        load_control_vector(hand_written("width.gguf", {"direction.1": ones, "direction.2": np.ones(5, np.float32)}))
    with pytest.raises(ValueError, match="failed to load"):
        (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
        load_control_vector(tmp_path / "junk.gguf")


def test_verify_export_refuses_bad_flags():
    from steerstore.infra.config import ConfigError, from_dict
    from steerstore.jobs.verify_export import VerifyExportConfig

    for options, message in [({"user": "u", "engine": "vllm"}, "engine"), ({}, "--user is required"),
                             ({"method": "population", "user": "u"}, "drop --user"),
                             ({"user": "u", "method": "dps"}, "vector method"),
                             ({"user": "u", "agree_tokens": 9, "new_tokens": 8}, "agree_tokens")]:
        with pytest.raises(ConfigError, match=message):
            from_dict(VerifyExportConfig, options)
