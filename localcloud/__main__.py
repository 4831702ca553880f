"""Command line for localcloud:
`python -m localcloud [--state-dir DIR] up|start|stop|status|print-access-token`.

`up` serves in the foreground until SIGTERM or SIGINT. `start` runs `up` in the
background and prints the endpoints once the gRPC port accepts calls. `stop` ends the
process that serves a state folder, and `status` prints its endpoints.
`print-access-token` prints an access token for the registry, as `gcloud auth
print-access-token` does for Artifact Registry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import grpc

from localcloud.server import ENDPOINTS_FILE, Endpoints, LocalCloud

logger = logging.getLogger("localcloud")

STATE_DIR_ENV = "LOCALCLOUD_STATE_DIR"
LOG_FILE = "localcloud.log"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.1
ACCESS_TOKEN_PRINCIPAL = "developer@localcloud.iam.gserviceaccount.com"


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or ".localcloud")


def running_endpoints(state_dir: Path) -> Endpoints | None:
    """Return the endpoints of the localcloud serving `state_dir`, or None."""
    try:
        endpoints = Endpoints.read(state_dir)
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None
    return endpoints if _is_localcloud_process(endpoints.pid) else None


def process_running(pid: int) -> bool:
    """Return whether `pid` runs; a process that exited but is not reaped does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state letter follows the command name, which is in parentheses.
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _is_localcloud_process(pid: int) -> bool:
    if not process_running(pid):
        return False
    # The pid in a stale endpoints file may belong to an unrelated process by now.
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"localcloud" in command_line


def _grpc_ready(address: str, timeout: float) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
    return True


def _print_endpoints(endpoints: Endpoints) -> None:
    print(json.dumps(asdict(endpoints), indent=2))


def command_up(state_dir: Path) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    running = running_endpoints(state_dir)
    if running is not None:
        logger.error(
            "localcloud already serves %s as pid %d; run `python -m localcloud stop` "
            "first or use another --state-dir",
            state_dir,
            running.pid,
        )
        return 1

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    cloud = LocalCloud(state_dir)
    try:
        cloud.start()
        stop_requested.wait()
    finally:
        cloud.stop()
    logger.info("localcloud stopped")
    return 0


def command_start(state_dir: Path) -> int:
    running = running_endpoints(state_dir)
    if running is not None:
        _print_endpoints(running)
        return 0

    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
    log_path = state_dir / LOG_FILE
    command = [sys.executable, "-m", "localcloud", "--state-dir", str(state_dir), "up"]
    with log_path.open("ab") as log:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if child.poll() is not None:
            print(
                f"localcloud exited with status {child.returncode} while starting; "
                f"see {log_path}",
                file=sys.stderr,
            )
            return 1
        endpoints = running_endpoints(state_dir)
        if endpoints is not None and endpoints.pid == child.pid:
            remaining = max(deadline - time.monotonic(), POLL_SECONDS)
            if _grpc_ready(endpoints.grpc, timeout=remaining):
                _print_endpoints(endpoints)
                return 0
        time.sleep(POLL_SECONDS)

    child.terminate()
    print(
        f"localcloud did not answer within {START_TIMEOUT_SECONDS:.0f} s and was "
        f"stopped; see {log_path}",
        file=sys.stderr,
    )
    return 1


def command_stop(state_dir: Path) -> int:
    endpoints = running_endpoints(state_dir)
    if endpoints is None:
        print(f"localcloud is not running for {state_dir}", file=sys.stderr)
        return 0
    os.kill(endpoints.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not process_running(endpoints.pid):
            print(f"localcloud (pid {endpoints.pid}) stopped")
            return 0
        time.sleep(POLL_SECONDS)
    print(
        f"localcloud (pid {endpoints.pid}) did not exit within "
        f"{STOP_TIMEOUT_SECONDS:.0f} s of SIGTERM; see {state_dir / LOG_FILE}",
        file=sys.stderr,
    )
    return 1


def command_status(state_dir: Path) -> int:
    endpoints = running_endpoints(state_dir)
    if endpoints is None:
        print(f"localcloud is not running for {state_dir}", file=sys.stderr)
        return 1
    _print_endpoints(endpoints)
    return 0


def command_print_access_token(state_dir: Path) -> int:
    from localcloud.tokens import TokenAuthority

    if running_endpoints(state_dir) is None:
        print(f"localcloud is not running for {state_dir}", file=sys.stderr)
        return 1
    # The token is signed with the key in the state folder, so the running localcloud
    # accepts it. Use it as Basic oauth2accesstoken:TOKEN or as Bearer TOKEN.
    print(TokenAuthority(state_dir).issue_access_token(ACCESS_TOKEN_PRINCIPAL))
    return 0


COMMANDS = {
    "up": command_up,
    "start": command_start,
    "stop": command_stop,
    "status": command_status,
    "print-access-token": command_print_access_token,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localcloud",
        description=(
            "Run the local stand-in for Google Cloud APIs, a registry and the Hub."
        ),
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"folder that keeps every resource (default: ${STATE_DIR_ENV} or "
        "./.localcloud)",
    )
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        help="up: serve in the foreground; start: serve in the background and print "
        "the endpoints; stop: stop the background server; status: print its endpoints; "
        "print-access-token: print a registry access token valid for one hour",
    )
    args = parser.parse_args(argv)
    state_dir = (args.state_dir or default_state_dir()).resolve()
    return COMMANDS[args.command](state_dir)


if __name__ == "__main__":
    sys.exit(main())
