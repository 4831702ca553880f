"""The localcloud process: Google APIs over gRPC, an OCI registry, a Hugging Face Hub
API and the Cloud Run runtime, all bound to loopback and sharing one state folder.

`LocalCloud` is the context every part receives. Each API module exposes
`handlers(cloud) -> list[grpc.GenericRpcHandler]`; the runtime, registry and hub are
started here and reachable through the attributes below.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from localcloud.store import Store
from localcloud.tokens import TokenAuthority

if TYPE_CHECKING:
    from localcloud.alerting import AlertEvaluator
    from localcloud.api.compute import ComputeServer
    from localcloud.api.logging import LogSink
    from localcloud.api.operations import Operations
    from localcloud.api.run import RunApi
    from localcloud.hub.server import HubServer
    from localcloud.registry import LocalRegistry
    from localcloud.runtime.runtime import Runtime

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ENDPOINTS_FILE = "endpoints.json"


@dataclass(frozen=True)
class Endpoints:
    """Addresses of a running localcloud, written to `<state_dir>/endpoints.json`."""

    grpc: str  # host:port of every Google API
    # host:port of the OCI registry's authenticated front (plain HTTP)
    registry: str
    hub: str  # base URL of the Hugging Face Hub API
    compute: str  # base URL of the Compute Engine REST API (plain HTTP)
    pid: int

    @classmethod
    def read(cls, state_dir: Path) -> Endpoints:
        data = json.loads((state_dir / ENDPOINTS_FILE).read_text())
        return cls(**data)


class LocalCloud:
    def __init__(
        self, state_dir: Path, alert_interval_seconds: float | None = None
    ) -> None:
        """`alert_interval_seconds` sets how often alert policies are evaluated
        (default `localcloud.alerting.DEFAULT_INTERVAL_SECONDS`)."""
        self.state_dir = state_dir.resolve()
        self.alert_interval_seconds = alert_interval_seconds
        self.alerting: AlertEvaluator | None = None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "resources")
        self.tokens = TokenAuthority(self.state_dir)
        self.grpc_server: grpc.Server | None = None
        self.grpc_address = ""
        self.compute: ComputeServer | None = None
        # Set by start(); typed here so every part can rely on them.
        self.operations: Operations
        self.logs: LogSink
        self.registry: LocalRegistry
        self.hub: HubServer
        self.runtime: Runtime
        self.run_api: RunApi

    def start(self) -> Endpoints:
        from localcloud.api import (
            artifacts,
            compute,
            iamcredentials,
            monitoring,
            operations,
            run,
            secrets,
        )
        from localcloud.api import logging as logging_api
        from localcloud.hub.server import HubServer
        from localcloud.registry import LocalRegistry
        from localcloud.runtime.runtime import Runtime

        self.operations = operations.Operations(self)
        self.logs = logging_api.LogSink(self)
        # docker-registry behind a front that checks access tokens, as Artifact
        # Registry does. Every client, the runtime's pulls included, uses the front.
        self.registry = LocalRegistry(self.state_dir / "registry", self.tokens)
        self.registry.start()
        self.hub = HubServer(self.state_dir / "hub")
        self.hub.start()
        self.runtime = Runtime(self)
        # Before the gRPC server: recovery below needs the front doors, and stops
        # instances that a killed localcloud left running.
        self.runtime.start()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        for module in (
            operations,
            run,
            secrets,
            artifacts,
            logging_api,
            monitoring,
            iamcredentials,
        ):
            server.add_generic_rpc_handlers(module.handlers(self))
        port = server.add_insecure_port(f"{LOOPBACK}:0")
        # Resume what a crash left unfinished before any call can queue behind it.
        resumed = self.run_api.recover()
        self.operations.abort_pending(keep=resumed)
        server.start()
        self.grpc_server = server
        self.grpc_address = f"{LOOPBACK}:{port}"
        # google-cloud-compute has only a REST transport, so Compute gets its own
        # HTTP port.
        self.compute = compute.ComputeServer(self, LOOPBACK)
        self.compute.start()

        self.alerting = self._start_alerting()
        endpoints = Endpoints(
            grpc=self.grpc_address,
            registry=self.registry.address,
            hub=self.hub.url,
            compute=self.compute.url,
            pid=os.getpid(),
        )
        tmp = self.state_dir / (ENDPOINTS_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(endpoints)))
        os.replace(tmp, self.state_dir / ENDPOINTS_FILE)
        logger.info("localcloud listening: %s", endpoints)
        return endpoints

    def _start_alerting(self) -> AlertEvaluator:
        from localcloud.alerting import DEFAULT_INTERVAL_SECONDS, AlertEvaluator

        interval = self.alert_interval_seconds or DEFAULT_INTERVAL_SECONDS
        evaluator = AlertEvaluator(self, interval)
        evaluator.start()
        return evaluator

    def stop(self) -> None:
        (self.state_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        if self.alerting is not None:
            # Stopped first, so no notification goes out while the rest shuts down.
            self.alerting.stop()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=1).wait()
        if self.compute is not None:
            self.compute.stop()
        for part in ("runtime", "hub", "registry"):
            component = getattr(self, part, None)
            if component is not None:
                component.stop()
