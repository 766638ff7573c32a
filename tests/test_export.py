"""The export job and its formats: llama.cpp GGUF, EasySteer JSON and safetensors round trips."""

import base64
import hashlib
import json

import gguf
import numpy as np
import pyarrow as pa
import pytest

from steerstore.infra.config import from_dict
from steerstore.infra.exports import (
    READERS,
    CorruptExport,
    ExportError,
    ExportItem,
    encode_gguf,
    file_stem,
    model_hint,
    read_easysteer,
)
from steerstore.infra.reader import StoreReader, UserVectors
from steerstore.jobs import cli, export
from steerstore.schemas.store import STORE_TABLES

USERS = ["ann", "ben", "cat", "dan"]


def run_export(store, out, **options):
    return export.main(from_dict(export.ExportConfig, {"store": store, "out": str(out), **options}))


def hand_made(layers, recommended, hidden=4):
    vectors = np.arange(len(layers) * hidden, dtype=np.float32).reshape(len(layers), hidden) / 7
    return UserVectors("eve", layers, vectors, recommended, 2.5, "response", "tiny", "fp", 3)


def gguf_contents(path):
    reader = gguf.GGUFReader(path)
    meta = {name: f.contents() for name, f in reader.fields.items()}
    return {t.name: np.array(t.data) for t in reader.tensors}, meta


@pytest.fixture(scope="module")
def store(served_store):
    return served_store[0]


def test_gguf_holds_the_store_vectors_as_llama_cpp_control_vectors(store, tmp_path):
    stored = StoreReader(store).vectors(["ann"])["ann"]
    summary = run_export(store, tmp_path, user="ann", format="gguf")
    (written,) = summary["files"]
    tensors, meta = gguf_contents(written["files"][0])
    assert written["layers"] == stored.recommended_layers == [1, 2]
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for layer, vector in stored.at([1, 2]).items():
        assert tensors[f"direction.{layer}"].dtype == np.float32
        np.testing.assert_array_equal(tensors[f"direction.{layer}"], vector)
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == "llama" and meta["controlvector.layer_count"] == 2
    assert meta["steerstore.scale"] == pytest.approx(stored.recommended_scale)
    assert meta["steerstore.user_id"] == "ann" and meta["steerstore.method"] == "caa"
    assert meta["steerstore.model_fingerprint"] == stored.model_fingerprint
    assert meta["steerstore.positions"] == stored.positions
    assert meta["steerstore.store_version"] == summary["version"]


@pytest.mark.parametrize("fmt", ["easysteer", "safetensors"])
def test_every_format_reads_back_the_numbers_the_store_reader_gives(store, tmp_path, fmt):
    stored = StoreReader(store).vectors(["ann"])["ann"]
    (written,) = run_export(store, tmp_path, user="ann", format=fmt, layers="all")["files"]
    loaded = READERS[fmt](written["files"][0])
    assert sorted(loaded.vectors) == stored.layers == [0, 1, 2]
    for layer, vector in stored.at(stored.layers).items():
        np.testing.assert_array_equal(loaded.vectors[layer], vector)
    assert loaded.meta["scale"] == pytest.approx(stored.recommended_scale)
    assert loaded.meta["recommended_layers"] == [1, 2] and loaded.meta["hook"] == "block_output"
    assert loaded.meta["model_fingerprint"] == stored.model_fingerprint and loaded.meta["user_id"] == "ann"


def test_bt_export_equals_the_composed_vector(store, tmp_path):
    composed = StoreReader(store).bt(["ben"])["ben"]
    (written,) = run_export(store, tmp_path, user="ben", method="bt", format="safetensors")["files"]
    loaded = READERS["safetensors"](written["files"][0])
    assert loaded.meta["method"] == "bt" and sorted(loaded.vectors) == composed.recommended_layers
    for layer, vector in composed.at(composed.recommended_layers).items():
        np.testing.assert_array_equal(loaded.vectors[layer], vector)


def test_population_export_writes_the_one_population_vector(store, tmp_path):
    population = StoreReader(store).population()
    summary = run_export(store, tmp_path, method="population", format="easysteer")
    (written,) = summary["files"]
    assert written["files"][0].endswith("population.easysteer.json") and written["user_id"] is None
    loaded = read_easysteer(written["files"][0])
    assert loaded.meta["scope"] == "population" and loaded.meta["user_id"] is None
    for layer, vector in population.at(population.recommended_layers).items():
        np.testing.assert_array_equal(loaded.vectors[layer], vector)


def test_steerx_export_takes_the_store_source_unless_one_is_given(store, tmp_path):
    reader = StoreReader(store)
    summary = run_export(store, tmp_path, user="ann", method="style_vector", format="safetensors")
    default = reader.vectors(["ann"], method="steerx")["ann"]
    loaded = READERS["safetensors"](summary["files"][0]["files"][0])
    assert loaded.meta["source"] == summary["source"]
    for layer, vector in default.at(default.recommended_layers).items():
        np.testing.assert_array_equal(loaded.vectors[layer], vector)
    history = run_export(store, tmp_path, user="ann", method="style_vector", source="history", format="safetensors")
    assert history["files"][0]["files"][0].endswith("ann.style_vector-history.safetensors")


def test_layer_0_is_left_out_of_the_gguf_file_with_a_note(store, tmp_path, capsys):
    (written,) = run_export(store, tmp_path, user="ann", format="gguf", layers="all")["files"]
    tensors, _ = gguf_contents(written["files"][0])
    assert sorted(tensors) == ["direction.1", "direction.2"]
    assert any("layer 0 left out" in note for note in written["notes"])
    out = capsys.readouterr().out
    assert "layer 0 left out" in out and "--control-vector-layer-range 1 2" in out


def test_a_recommended_layer_0_is_a_loud_warning_and_layer_0_alone_cannot_be_exported():
    encoded = encode_gguf(ExportItem(hand_made([0, 1], [0, 1]), "caa", "pairs", "v", "llama"))
    assert encoded.layers == [1] and encoded.notes[0].startswith("WARNING: recommended layer 0")
    with pytest.raises(ExportError, match="layer 0 only"):
        encode_gguf(ExportItem(hand_made([0], [0]), "caa", "pairs", "v", "llama"))


def test_the_easysteer_payload_checks_out_and_a_corrupted_one_is_detected(store, tmp_path):
    (written,) = run_export(store, tmp_path, user="cat", format="easysteer")["files"]
    path = written["files"][0]
    doc = json.loads(open(path).read())
    (vector,) = doc["steering"]["vectors"]
    assert set(vector) == {"data", "algorithm", "scale", "layers", "normalize", "apply", "name"}  # EasySteer's own
    assert vector["algorithm"] == "direct" and vector["layers"] == [1, 2] and vector["normalize"] is False
    assert vector["apply"] == {"prompt_positions": [-1], "generation": "all"}  # positions = response
    wire = vector["data"]
    digest = hashlib.sha256(b"direction:1")  # EasySteer's content hash, step by step
    for name in sorted(wire["tensors"]):
        raw = base64.b64decode(wire["tensors"][name]["data"])
        assert hashlib.sha256(raw).hexdigest() == doc["steerstore"]["sha256"][name]
        digest.update(name.encode() + str(tuple(wire["tensors"][name]["shape"])).encode() + raw)
    assert digest.hexdigest() == wire["sha256"]

    raw = bytearray(base64.b64decode(wire["tensors"]["layer.1"]["data"]))
    raw[0] ^= 1
    wire["tensors"]["layer.1"]["data"] = base64.b64encode(bytes(raw)).decode()
    (tmp_path / "corrupt.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptExport, match="layer.1 does not match its sha256"):
        read_easysteer(str(tmp_path / "corrupt.json"))


def test_an_absent_user_gets_no_file_and_a_reason(store, tmp_path, capsys):
    summary = run_export(store, tmp_path / "out", user="zed", format="gguf")
    assert summary["files"] == [] and not (tmp_path / "out").exists()
    assert "it was not in the inputs" in summary["skipped"]["zed"]
    assert "skipped: user 'zed' has no CAA vectors" in capsys.readouterr().out
    assert run_export(store, tmp_path / "out", user=" ", format="gguf")["skipped"] == {" ": "the user id is empty"}
    from steerstore.jobs import cli

    # from the command line, nothing exported is a failure a script can see
    assert cli.main(["export", "--store", store, "--user", "zed", "--format", "gguf", "--out", str(tmp_path)]) == 1
    assert "steerstore export: nothing was exported: user 'zed' has no CAA vectors" in capsys.readouterr().err
    assert cli.main(["export", "--store", store, "--user", "ann", "--format", "gguf", "--out", str(tmp_path)]) == 0


def test_a_quarantined_user_gets_no_file_and_the_quarantine_reason(store, tmp_path, monkeypatch):
    # the shared store quarantines nobody: its users table reports eve as quarantined here
    eve = {"user_id": "eve", "status": "quarantined", "reason": "too few valid pairs", "methods": []}
    monkeypatch.setattr(StoreReader, "users",
                        lambda self, ids=None: pa.Table.from_pylist([eve], schema=STORE_TABLES["users"]))
    summary = run_export(store, tmp_path, user="eve", format="safetensors")
    assert summary["files"] == [] and list(tmp_path.iterdir()) == []
    assert summary["skipped"]["eve"].endswith("it is quarantined: too few valid pairs")


def test_all_exports_every_stored_user_reading_vectors_in_batches(store, tmp_path, monkeypatch):
    calls = []
    vectors = StoreReader.vectors

    def counted(self, ids, *args, **kwargs):
        calls.append(ids)
        return vectors(self, ids, *args, **kwargs)

    monkeypatch.setattr(export, "BATCH_USERS", 3)
    monkeypatch.setattr(StoreReader, "vectors", counted)
    summary = run_export(store, tmp_path, all=True, format="safetensors")
    assert sorted(f["user_id"] for f in summary["files"]) == USERS and summary["skipped"] == {}
    assert [len(ids) for ids in calls] == [3, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{u}.caa{suffix}" for u in USERS for suffix in (".safetensors", ".json"))


def test_the_cli_exports_and_prints_the_llama_cpp_flags(store, tmp_path, capsys):
    assert cli.main(["export", "--store", store, "--user", "dan", "--format", "gguf", "--out", str(tmp_path)]) == 0
    path = tmp_path / "dan.caa.gguf"
    scale = StoreReader(store).vectors(["dan"])["dan"].recommended_scale
    assert path.exists() and f"--control-vector-scaled {path} {scale:g}" in capsys.readouterr().out
    assert cli.main(["export", "--store", store, "--format", "gguf"]) == 2  # neither --user nor --all
    assert "exactly one of --user ID and --all" in capsys.readouterr().err


def test_the_model_hint_comes_from_the_model_config_or_else_its_id(served_store):
    assert model_hint({"model": {"name_or_path": served_store[1]}}) == "llama"
    assert model_hint({"model": {"name_or_path": "smollm2-135m-instruct",
                                 "id": "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-q4_1"}}) == "llama"
    assert model_hint({"model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}}) == "qwen2"


def test_file_names_are_safe_and_distinct_for_any_user_id():
    stems = {file_stem(u, "caa", "pairs") for u in ["ann", "a/b", "a_b", "../etc", "ünï", "population"]}
    assert len(stems) == 6 and "ann.caa" in stems
    assert all("/" not in s and not s.startswith(".") for s in stems)
    assert file_stem(None, "population", "pairs") == "population"

