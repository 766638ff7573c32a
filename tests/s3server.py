"""A real S3-protocol server (moto in server mode) on loopback, for tests and benchmarks that talk HTTP to "S3".

moto is an optional dependency (the `test` extra)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.request

from steerstore.infra.storage import StorageConfig

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1, on a port the OS picks.

    Start one per test: RAY-NOTES records that a long-lived server made S3 calls hang. moto keeps
    its data process-wide and start() resets it, so run one server per process at a time.
    """

    def __init__(self) -> None:
        self._server = None
        self.endpoint_url = ""

    def start(self, port: int = 0, reset: bool = True) -> S3Server:
        """Start serving (``port`` 0: one the OS picks); ``reset=False`` keeps the objects of a stopped server."""
        from moto.server import ThreadedMotoServer  # noqa: PLC0415  (moto is a test-only dependency)

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        # Keep the SDKs from probing EC2 instance metadata for credentials (slow off-EC2).
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        # Port 0: the OS binds a free port atomically, so parallel test runs cannot collide.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        if reset:  # moto keeps its buckets in process-global state that outlives a server; start empty
            self._post("/moto-api/reset")
        return self

    def restart(self, down_s: float) -> None:
        """Stop serving for ``down_s`` seconds (connections refused), then serve the same objects on the same port."""
        import time  # noqa: PLC0415

        port = int(self.endpoint_url.rsplit(":", 1)[1])
        self.stop()
        time.sleep(down_s)
        for _ in range(50):  # the port can take a moment to be free again
            try:
                self.start(port=port, reset=False)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"could not restart the S3 server on port {port}")

    def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        host, port = server.get_host_and_port()
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        # The serving loop checks for shutdown only every 0.5 s; a connection wakes it at once.
        while stopper.is_alive():
            try:
                socket.create_connection((host, port), timeout=0.1).close()
            except OSError:
                pass
            stopper.join(0.02)
        # moto's stop() leaves the listening socket open; close it so the port refuses connections.
        server._server.server_close()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _post(self, path: str) -> None:
        request = urllib.request.Request(self.endpoint_url + path, data=b"", method="POST")
        # A direct connection: a proxy from the environment must not see 127.0.0.1 traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            response.read()

    def storage_config(self) -> StorageConfig:
        return StorageConfig(endpoint_url=self.endpoint_url, region=REGION,
                             access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)

    def client(self):
        """A boto3 S3 client for this server (for test setup and inspection)."""
        import boto3  # noqa: PLC0415

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point an SDK at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }


def main() -> None:
    """``make s3-local``: serve on loopback with a bucket ``steerstore`` until interrupted; print the environment."""
    import time

    with S3Server() as server:
        server.create_bucket("steerstore")
        print("S3 test server (moto) on", server.endpoint_url, "with bucket 'steerstore'. In another shell:\n")
        for key, value in server.env().items():
            print(f"export {key}={value}")
        print("\nthen use a store URI such as s3://steerstore/store (e.g. --output.store, --store).\n"
              "Data lives in memory until this process stops (Ctrl-C).", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
