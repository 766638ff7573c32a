"""The storage layer and the versioned steering store, on local disk and on a real S3-protocol server."""

from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from steerstore.infra import storage
from steerstore.infra.config import ConfigError
from steerstore.infra.storage import StorageConfig
from steerstore.infra.store import SteeringStore, StoreNotFound
from steerstore.schemas.store import schema_to_b64
from tests.s3server import S3Server

BUCKET = "steer-test"
FAST = StorageConfig(retries=3, retry_backoff_s=0.0)


@pytest.fixture
def s3_server():
    # Function-scoped on purpose: RAY-NOTES records S3 calls hanging against a long-lived server.
    with S3Server() as server:
        server.create_bucket(BUCKET)
        yield server


@dataclass
class Root:
    uri: str
    cfg: StorageConfig | None


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def root(request, tmp_path) -> Root:
    if request.param == "local":
        return Root(str(tmp_path / "root"), None)
    server = request.getfixturevalue("s3_server")
    return Root(f"s3://{BUCKET}/some/prefix", server.storage_config())


def people() -> pa.Table:
    return pa.table({"user_id": ["a", "b", "c", "d"], "score": [0.1, 0.9, 0.5, 0.7]})


def write_parquet(store: SteeringStore, version: str, table: str, data: pa.Table, name: str) -> None:
    fs, path = storage.filesystem(storage.join(store.table_uri(version, table), name), store.storage)
    storage.make_dirs(store.table_uri(version, table), store.storage)
    pq.write_table(data, path, filesystem=fs)


# ---------------------------------------------------------------------------------------------
# files


def test_written_bytes_read_back_and_show_up_in_listings(root):
    storage.write_bytes(storage.join(root.uri, "dir/a.bin"), b"\x00\x01", root.cfg)
    storage.write_text(storage.join(root.uri, "dir", "sub", "b.txt"), "héllo", root.cfg)
    storage.write_text(storage.join(root.uri, "top.json"), "{}", root.cfg)

    assert storage.read_bytes(storage.join(root.uri, "dir/a.bin"), root.cfg) == b"\x00\x01"
    assert storage.read_text(storage.join(root.uri, "dir/sub/b.txt"), root.cfg) == "héllo"
    assert storage.exists(storage.join(root.uri, "dir/a.bin"), root.cfg)
    assert storage.exists(storage.join(root.uri, "dir"), root.cfg)
    assert not storage.exists(storage.join(root.uri, "dir/missing.bin"), root.cfg)
    assert storage.list_dir(root.uri, root.cfg) == ["dir", "top.json"]
    assert storage.list_dir(storage.join(root.uri, "dir"), root.cfg) == ["a.bin", "sub"]
    assert storage.list_dir(storage.join(root.uri, "nothing-here"), root.cfg) == []
    assert storage.list_files(root.uri, root.cfg) == [
        storage.join(root.uri, "dir/a.bin"), storage.join(root.uri, "dir/sub/b.txt"),
        storage.join(root.uri, "top.json")]
    assert storage.list_files(root.uri, root.cfg, suffix=".txt") == [storage.join(root.uri, "dir/sub/b.txt")]


def test_overwriting_a_file_replaces_it_without_leaving_temporary_files(root):
    uri = storage.join(root.uri, "LATEST")
    storage.write_text(uri, "one", root.cfg)
    storage.write_text(uri, "two", root.cfg)
    assert storage.read_text(uri, root.cfg) == "two"
    assert storage.list_dir(root.uri, root.cfg) == ["LATEST"]


def test_reading_a_missing_file_raises_file_not_found_without_retrying(root, caplog):
    with caplog.at_level(logging.WARNING, logger="steerstore.storage"):
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(storage.join(root.uri, "missing"), root.cfg)
    assert caplog.records == []


def test_join_uses_single_slashes_and_keeps_the_scheme():
    assert storage.join("s3://b/a", "x") == "s3://b/a/x"
    assert storage.join("s3://b/a/", "/x/", "y") == "s3://b/a/x/y"
    assert storage.join("/tmp//store", "versions", "v1/") == "/tmp/store/versions/v1"
    assert storage.join("relative/dir", "f.json") == "relative/dir/f.json"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/s3://x")


def test_filesystem_maps_local_paths_and_s3_uris_to_pyarrow_paths(tmp_path):
    fs, path = storage.filesystem(f"file://{tmp_path}/a")
    assert type(fs).__name__ == "LocalFileSystem" and path == f"{tmp_path}/a"
    fs, path = storage.filesystem("s3://bucket/key/", StorageConfig(endpoint_url="http://127.0.0.1:9"))
    assert type(fs).__name__ == "S3FileSystem" and path == "bucket/key"
    with pytest.raises(ValueError, match="unsupported"):
        storage.filesystem("gs://bucket/key")


def test_a_small_s3_write_is_a_single_put_not_a_multipart_upload(s3_server):
    storage.write_text(f"s3://{BUCKET}/store/LATEST", "20261123T220501Z-3f9a1c", s3_server.storage_config())
    etag = s3_server.client().head_object(Bucket=BUCKET, Key="store/LATEST")["ETag"]
    assert "-" not in etag  # multipart uploads get an ETag ending in -<number of parts>


def test_s3_filesystems_are_shared_and_survive_pickling_for_ray_workers(s3_server):
    cfg = s3_server.storage_config()
    storage.write_text(f"s3://{BUCKET}/x.txt", "shipped", cfg)
    fs, path = storage.filesystem(f"s3://{BUCKET}/x.txt", cfg)
    assert storage.filesystem(f"s3://{BUCKET}/other", cfg)[0] is fs
    clone = pickle.loads(pickle.dumps(fs))
    with clone.open_input_stream(path) as f:
        assert f.read() == b"shipped"


def test_endpoint_region_and_credentials_come_from_the_standard_environment(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    # The S3-specific variable wins over the generic one, as in the AWS SDKs.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)

    uri = f"s3://{BUCKET}/from-env.txt"
    storage.write_text(uri, "env", StorageConfig())
    assert storage.read_text(uri) == "env"
    assert storage.filesystem(uri)[0].region == "eu-west-3"


def test_storage_config_rejects_values_that_cannot_work():
    with pytest.raises(ConfigError, match="retries"):
        StorageConfig(retries=0)
    with pytest.raises(ConfigError, match="retry_backoff_s"):
        StorageConfig(retry_backoff_s=-1)
    with pytest.raises(ConfigError, match="endpoint_url"):
        StorageConfig(endpoint_url="127.0.0.1:9000")
    with pytest.raises(ConfigError, match="together"):
        StorageConfig(access_key_id="only-half")
    assert "sekrit" not in repr(StorageConfig(access_key_id="k", secret_access_key="sekrit"))


# ---------------------------------------------------------------------------------------------
# retries


def test_transient_errors_are_retried_until_the_call_succeeds(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, "
                          "Connection reset by peer")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="steerstore.storage"):
        assert storage.with_retries(flaky, FAST, "read thing") == "ok"
    assert len(calls) == 3
    assert [r.name for r in caplog.records] == ["steerstore.storage"] * 2
    assert "read thing" in caplog.records[0].getMessage()


@pytest.mark.parametrize("error", [
    FileNotFoundError("Path does not exist 'bucket/key'"),
    OSError("AWS Error ACCESS_DENIED during HeadObject operation: Access Denied"),
    OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation: The specified bucket does not exist"),
    ValueError("not a storage problem"),
])
def test_permanent_errors_are_raised_after_exactly_one_call(error):
    calls = []

    def broken():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        storage.with_retries(broken, FAST, "read thing")
    assert len(calls) == 1


def test_retries_stop_after_the_configured_number_of_attempts():
    calls = []

    def throttled():
        calls.append(1)
        raise OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate.")

    with pytest.raises(OSError, match="SLOW_DOWN"):
        storage.with_retries(throttled, StorageConfig(retries=4, retry_backoff_s=0.0), "write thing")
    assert len(calls) == 4


@pytest.mark.parametrize("message, transient", [
    ("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: ", True),
    ("AWS Error INTERNAL_FAILURE during PutObject operation: We encountered an internal error", True),
    ("AWS Error THROTTLING during ListObjectsV2 operation: Rate exceeded", True),
    ("AWS Error REQUEST_TIMEOUT during GetObject operation: timed out", True),
    ("AWS Error UNKNOWN (HTTP status 404) during HeadObject operation: ", False),
    ("AWS Error INVALID_ACCESS_KEY_ID during GetObject operation: bad key", False),
    ("AWS Error SIGNATURE_DOES_NOT_MATCH during GetObject operation: check your key", False),
])
def test_errors_are_classified_by_the_aws_error_in_their_message(message, transient):
    assert storage.is_transient(OSError(message)) is transient


@pytest.mark.slow
def test_a_server_that_refuses_connections_is_a_transient_error(tmp_path):
    server = S3Server().start()
    cfg = StorageConfig(endpoint_url=server.endpoint_url, access_key_id="testing", secret_access_key="testing",
                        retries=1)
    server.stop()
    with pytest.raises(OSError) as raised:
        storage.read_bytes(f"s3://{BUCKET}/anything", cfg)
    assert storage.is_transient(raised.value)


# ---------------------------------------------------------------------------------------------
# the steering store


def test_version_ids_sort_by_utc_time_and_are_unique():
    earlier = SteeringStore.new_version_id(datetime(2026, 11, 23, 22, 5, 1, tzinfo=timezone.utc))
    later = SteeringStore.new_version_id(datetime(2026, 11, 24, 1, 0, 0, tzinfo=timezone.utc))
    assert earlier.startswith("20261123T220501Z-") and len(earlier) == len("20261123T220501Z-3f9a1c")
    assert earlier < later
    assert SteeringStore.new_version_id() != SteeringStore.new_version_id()


def test_a_version_is_invisible_until_published_and_visible_after(root):
    store = SteeringStore(root.uri, root.cfg)
    version = store.new_version_id()
    write_parquet(store, version, "people", people(), "part-0.parquet")

    assert store.versions() == []
    assert store.latest() is None
    with pytest.raises(StoreNotFound, match=r"no published version.*steerstore refresh") as raised:
        store.resolve()
    assert root.uri in str(raised.value)

    store.publish(version, {"tables": {"people": {"rows": 4}}})

    assert store.versions() == [version]
    assert store.latest() == version
    assert store.resolve() == version
    assert store.read_manifest() == {"tables": {"people": {"rows": 4}}}
    assert storage.read_text(storage.join(root.uri, "LATEST"), root.cfg) == version


def test_latest_is_written_after_the_manifest(root, monkeypatch):
    from steerstore.infra import store as store_module

    writes = []  # the order of the writes themselves (object stores' mtimes have one-second resolution)
    for name in ("write_text", "write_if"):
        real = getattr(store_module, name)
        monkeypatch.setattr(store_module, name, lambda uri, *a, _real=real, **k: (writes.append(uri), _real(uri, *a, **k))[1])
    store = SteeringStore(root.uri, root.cfg)
    version = store.new_version_id()
    store.publish(version, {"tables": {}})
    assert writes == [storage.join(store.version_uri(version), "manifest.json"), storage.join(root.uri, "LATEST")]
    assert json.loads(storage.read_text(storage.join(store.version_uri(version), "manifest.json"), root.cfg)) == {
        "tables": {}}


def test_an_older_version_published_after_a_newer_one_does_not_move_latest_back(root):
    store = SteeringStore(root.uri, root.cfg)
    older = store.new_version_id(datetime(2026, 11, 22, tzinfo=timezone.utc))
    newer = store.new_version_id(datetime(2026, 11, 23, tzinfo=timezone.utc))
    store.publish(newer, {"tables": {}})
    store.publish(older, {"tables": {}})
    assert store.latest() == newer
    assert store.versions() == [older, newer]


def test_republishing_a_version_is_refused_because_versions_are_immutable(root):
    store = SteeringStore(root.uri, root.cfg)
    version = store.new_version_id()
    store.publish(version, {"tables": {}, "run": 1})
    with pytest.raises(ValueError, match="already published"):
        store.publish(version, {"tables": {}, "run": 2})
    assert store.read_manifest(version)["run"] == 1


def test_a_latest_that_names_a_missing_version_is_reported_clearly(root):
    store = SteeringStore(root.uri, root.cfg)
    storage.write_text(storage.join(root.uri, "LATEST"), "20260101T000000Z-000000\n", root.cfg)
    with pytest.raises(StoreNotFound, match="LATEST names version '20260101T000000Z-000000'.*manifest.json"):
        store.latest()


def test_read_table_returns_the_written_parquet_files_with_projection_and_filter(root):
    store = SteeringStore(root.uri, root.cfg)
    version = store.new_version_id()
    data = people()
    write_parquet(store, version, "people", data.slice(0, 2), "part-0.parquet")
    write_parquet(store, version, "people", data.slice(2), "part-1.parquet")
    store.publish(version, {"tables": {"people": {"schema": schema_to_b64(data.schema)}}})

    assert store.table_files(version, "people") == [
        storage.join(store.table_uri(version, "people"), "part-0.parquet"),
        storage.join(store.table_uri(version, "people"), "part-1.parquet")]
    assert store.read_table("people").sort_by("user_id").equals(data)
    high = store.read_table("people", columns=["user_id"], filter=pc.field("score") > 0.6)
    assert sorted(high.column("user_id").to_pylist()) == ["b", "d"]
    assert high.column_names == ["user_id"]


def test_an_empty_table_folder_reads_as_an_empty_table_with_the_manifest_schema(root):
    store = SteeringStore(root.uri, root.cfg)
    version = store.new_version_id()
    schema = pa.schema([("user_id", pa.string()), ("vector", pa.list_(pa.float32()))])
    store.publish(version, {"tables": {"vectors": {"schema": schema_to_b64(schema)}, "other": {}}})

    empty = store.read_table("vectors")
    assert empty.num_rows == 0 and empty.schema == schema
    assert store.read_table("vectors", columns=["user_id"]).column_names == ["user_id"]
    with pytest.raises(FileNotFoundError, match="records no schema"):
        store.read_table("other")


def test_store_not_found_survives_pickling_so_ray_can_report_it():
    error = pickle.loads(pickle.dumps(StoreNotFound("s3://b/store")))
    assert isinstance(error, FileNotFoundError)
    assert "s3://b/store" in str(error) and "steerstore refresh" in str(error)


# ---------------------------------------------------------------------------------------------
# errors a person can act on


def test_an_endpoint_that_never_answers_fails_fast_naming_the_setting(capsys):
    import socket

    from steerstore.jobs import cli

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="k", secret_access_key="s",
                        connect_budget_s=1.0, retry_backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(storage.StorageUnreachable, match=rf"could not reach the object store at http://127.0.0.1:{port}"):
        storage.read_text("s3://bucket/LATEST", cfg)
    assert time.monotonic() - start < 15  # not the 5-minute retry budget of an endpoint that once answered
    flags = ["--storage.endpoint_url", f"http://127.0.0.1:{port}", "--storage.access_key_id", "k",
             "--storage.secret_access_key", "s", "--storage.connect_budget_s", "1"]
    assert cli.main(["inspect", "s3://bucket/store", *flags]) == 1
    err = capsys.readouterr().err
    assert "StorageUnreachable: could not reach the object store" in err and "--storage.endpoint_url" in err
    assert "Traceback" not in err and "--debug" in err
    with pytest.raises(storage.StorageUnreachable):
        cli.main(["--debug", "inspect", "s3://bucket/store", *flags])


def test_a_store_in_a_bucket_that_does_not_exist_says_so(s3_server):
    store = SteeringStore("s3://no-such-bucket/store", s3_server.storage_config())
    with pytest.raises(StoreNotFound, match="the bucket 'no-such-bucket' does not exist at http") as raised:
        store.resolve()
    assert "steerstore refresh" not in str(raised.value)
    with pytest.raises(StoreNotFound, match="no published version .*steerstore refresh"):
        SteeringStore(f"s3://{BUCKET}/empty", s3_server.storage_config()).resolve()


def test_a_version_without_a_weights_fingerprint_is_refused_not_silently_served(tmp_path):
    from steerstore.infra.reader import FingerprintMismatch, StoreReader

    store = SteeringStore(str(tmp_path / "store"))
    store.publish(store.next_version_id(), {"model": {"name_or_path": "x", "id": "x"}, "tables": {}})
    with pytest.raises(FingerprintMismatch, match="records no weights fingerprint"):
        StoreReader(store.uri).check_model("sha256:abc", "model x")
    fingerprinted = SteeringStore(str(tmp_path / "other"))
    fingerprinted.publish(fingerprinted.next_version_id(),
                          {"model": {"name_or_path": "x", "id": "x", "fingerprint": "sha256:abc"}, "tables": {}})
    StoreReader(fingerprinted.uri).check_model("sha256:abc", "model x")  # the same weights: served
    with pytest.raises(FingerprintMismatch, match="has weights fingerprint sha256:def"):
        StoreReader(fingerprinted.uri).check_model("sha256:def", "model x")
