"""Create the demo load balancer's target HTTPS proxy in localcloud, as Terraform would.

`python -m localcloud.edge_demo [--state-dir DIR] [--target FILE]` reads the project
and the proxy name from a target config and inserts the proxy through the Compute REST
API, with no SSL policy attached. Compute's default policy then allows TLS 1.0, so the
first refresh has something to fix. An existing proxy is left as it is, so the command
can run before every refresh.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from localcloud.server import Endpoints

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_SECONDS = 30.0
DEFAULT_TARGET = "deployments/targets/local.yaml"


def create_demo_proxy(compute_url: str, project: str, proxy: str) -> bool:
    """Insert the target HTTPS proxy `proxy`; return False when it already exists.

    The URL map and certificate it names are not emulated by localcloud, which stores
    the links without checking them.
    """
    body = {
        "name": proxy,
        "description": "Demo load balancer proxy created by localcloud.edge_demo",
        "urlMap": f"global/urlMaps/{proxy}-url-map",
        "sslCertificates": [f"global/sslCertificates/{proxy}-cert"],
    }
    request = urllib.request.Request(
        f"{compute_url}/compute/v1/projects/{project}/global/targetHttpsProxies",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code == 409:
            return False
        detail = exc.read().decode(errors="replace")
        raise RuntimeError(
            f"creating target HTTPS proxy {proxy!r} in {project} failed with "
            f"{exc.code}: {detail}"
        ) from exc
    logger.info("created target HTTPS proxy %s in %s", proxy, project)
    return True


def create_demo_proxy_for_target(compute_url: str, target: dict[str, Any]) -> bool:
    """Create the proxy named by a target config's load_balancer section, if any."""
    load_balancer = target.get("load_balancer")
    if not load_balancer:
        return False
    return create_demo_proxy(
        compute_url, target["target"]["project"], load_balancer["target_https_proxy"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localcloud.edge_demo",
        description="Create the target HTTPS proxy of a target config in localcloud, "
        "without an SSL policy.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="state folder of the running localcloud (default: $LOCALCLOUD_STATE_DIR "
        "or ./.localcloud)",
    )
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help="target config YAML to read"
    )
    args = parser.parse_args(argv)
    state_dir = (
        args.state_dir or Path(os.environ.get("LOCALCLOUD_STATE_DIR") or ".localcloud")
    ).resolve()
    try:
        endpoints = Endpoints.read(state_dir)
    except FileNotFoundError:
        print(
            f"localcloud is not running for {state_dir}: start it with "
            "`python -m localcloud start`",
            file=sys.stderr,
        )
        return 1
    target = yaml.safe_load(Path(args.target).read_text())
    if not target.get("load_balancer"):
        print(f"{args.target} has no load_balancer section; nothing to create")
        return 0
    name = target["load_balancer"]["target_https_proxy"]
    if create_demo_proxy_for_target(endpoints.compute, target):
        print(f"created target HTTPS proxy {name} without an SSL policy")
    else:
        print(f"target HTTPS proxy {name} already exists; left unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
