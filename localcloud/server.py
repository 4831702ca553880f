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
    from localcloud.api.logging import LogSink
    from localcloud.api.operations import Operations
    from localcloud.hub.server import HubServer
    from localcloud.registry import RegistryProcess
    from localcloud.runtime.runtime import Runtime

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ENDPOINTS_FILE = "endpoints.json"


@dataclass(frozen=True)
class Endpoints:
    """Addresses of a running localcloud, written to `<state_dir>/endpoints.json`."""

    grpc: str  # host:port of every Google API
    registry: str  # host:port of the OCI registry (plain HTTP)
    hub: str  # base URL of the Hugging Face Hub API
    pid: int

    @classmethod
    def read(cls, state_dir: Path) -> Endpoints:
        data = json.loads((state_dir / ENDPOINTS_FILE).read_text())
        return cls(**data)


class LocalCloud:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "resources")
        self.tokens = TokenAuthority(self.state_dir)
        self.grpc_server: grpc.Server | None = None
        self.grpc_address = ""
        # Set by start(); typed here so every part can rely on them.
        self.operations: Operations
        self.logs: LogSink
        self.registry: RegistryProcess
        self.hub: HubServer
        self.runtime: Runtime

    def start(self) -> Endpoints:
        from localcloud.api import (
            artifacts,
            iamcredentials,
            monitoring,
            operations,
            run,
            secrets,
        )
        from localcloud.api import logging as logging_api
        from localcloud.hub.server import HubServer
        from localcloud.registry import RegistryProcess
        from localcloud.runtime.runtime import Runtime

        self.operations = operations.Operations(self)
        self.logs = logging_api.LogSink(self)
        self.registry = RegistryProcess(self.state_dir / "registry")
        self.registry.start()
        self.hub = HubServer(self.state_dir / "hub")
        self.hub.start()
        self.runtime = Runtime(self)

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
        server.start()
        self.grpc_server = server
        self.grpc_address = f"{LOOPBACK}:{port}"

        self.runtime.start()
        endpoints = Endpoints(
            grpc=self.grpc_address,
            registry=self.registry.address,
            hub=self.hub.url,
            pid=os.getpid(),
        )
        tmp = self.state_dir / (ENDPOINTS_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(endpoints)))
        os.replace(tmp, self.state_dir / ENDPOINTS_FILE)
        logger.info("localcloud listening: %s", endpoints)
        return endpoints

    def stop(self) -> None:
        (self.state_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=1).wait()
        for part in ("runtime", "hub", "registry"):
            component = getattr(self, part, None)
            if component is not None:
                component.stop()
