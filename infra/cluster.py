"""The Ray connection: embedded local Ray by default, ``--ray.address`` for a cluster."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from steerstore.infra.config import check, option

log = logging.getLogger("steerstore")

# the project's own subpackages, shipped to a remote cluster's workers with the job
_PACKAGES = ("jobs", "operators", "schemas", "infra")


@dataclass
class RayConfig:
    address: str | None = option(
        None, help="Ray cluster address (e.g. ray://head:10001 or auto); empty = start embedded local Ray")
    num_cpus: int | None = option(
        None, help="logical CPUs of embedded Ray; default max(4, cores) — actor pools deadlock with fewer slots")
    object_store_mb: int | None = option(None, help="object store size of embedded Ray in MiB; default Ray's")
    progress_bars: bool = option(True, help="show Ray Data progress bars")
    ship_code: bool = option(
        True, help="with an address: send the steerstore packages to the workers (runtime_env py_modules)")

    def __post_init__(self) -> None:
        check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus must be >= 1")


def package_folder() -> str:
    """A temporary ``steerstore/`` folder holding a copy of the four subpackages, for runtime_env py_modules.

    ``steerstore`` is a namespace package whose subpackages live in four folders of the checkout
    (or of site-packages); Ray ships a folder under its own name, so the copy puts them under one
    ``steerstore`` folder that workers import exactly as the driver does.
    """
    import importlib
    import shutil
    import tempfile

    root = os.path.join(tempfile.mkdtemp(prefix="steerstore-ship-"), "steerstore")
    for name in _PACKAGES:
        source = importlib.import_module(f"steerstore.{name}").__path__[0]
        shutil.copytree(source, os.path.join(root, name), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def connect(config: RayConfig, min_cpus: int = 0) -> None:
    """Start or join Ray once per process; later calls reuse the connection.

    ``min_cpus``: logical CPUs the job's long-lived actors and tasks need at once; embedded Ray
    gets at least that many (more logical than physical CPUs only oversubscribes them).
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        if config.address:
            runtime_env = {}
            if config.ship_code:
                runtime_env["py_modules"] = [package_folder()]
            log.info("connecting to Ray at %s", config.address)
            ray.init(address=config.address, runtime_env=runtime_env or None, log_to_driver=True)
        else:
            num_cpus = config.num_cpus or max(4, os.cpu_count() or 1)
            if num_cpus < min_cpus:  # logical slots: fewer would deadlock the job's actors, more only oversubscribe
                log.info("embedded Ray: %d logical CPUs instead of %d (the job's actors and tasks need that many)",
                         min_cpus, num_cpus)
                num_cpus = min_cpus
            kwargs = {"object_store_memory": config.object_store_mb * 2**20} if config.object_store_mb else {}
            log.info("starting embedded Ray with %d logical CPUs", num_cpus)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **kwargs)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = config.progress_bars
    ctx.print_on_execution_start = False
