"""Benchmark the weights path: build and push generated safetensors to a local registry.

    .venv/bin/python scripts/benchmark.py [--sizes 1 4] [--output docs/benchmarks.md]

For each model size it generates random safetensors shards of at most 1 GiB under a
temporary folder in /tmp, starts Debian's docker-registry on 127.0.0.1 (a fresh storage
folder per step), and measures, side by side:

- read: a plain sequential read of the files;
- read + copy: the same bytes streamed to the registry as one blob, hashed on the way;
- model-refresh: `tasks.oci` builds the weights layer and pushes the image, once
  uncompressed and once with zstd level 1 (the default for weights) in one streamed
  PATCH, as on the local target, and once with zstd as one monolithic PUT after a
  measuring pass, as on Artifact Registry;
- a second model-refresh push of the same model, which should move no layer bytes;
- skopeo copy of an OCI layout that contains the same uncompressed tar layer (skopeo
  compresses it with gzip on the way to a Docker registry, as it does by default);
- GNU tar + gzip -1 + push: the tar stream piped through gzip into a file and hashed
  with sha256sum in the same pipeline, then pushed as one blob.

Every step runs in its own child process, so its peak RSS is that of the step alone
(from wait4). Times are wall-clock seconds of the step, with the files in the page
cache (they were just written, and the machine has the memory to keep them there).

Needs: `apt-get install docker-registry skopeo` (skopeo is optional: without it the
step is reported as not run). Generated files are deleted at the end. Loopback only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GIB = 1024**3
MIB = 1024**2
SHARD_BYTES = GIB
WRITE_CHUNK = 8 * MIB
BASE = "us-central1-docker.pkg.dev/localcloud/base/host-python:3.11"
MODEL_DIR = "/models/model"
NOT_RUN = float("nan")
EXPLANATION = """
Each step runs in its own process against a docker-registry on 127.0.0.1 with empty
storage. The model is random F16 safetensors shards of 1 GiB, which do not compress.
The files are in the page cache, so the plain read measures memory bandwidth rather
than the disk. `x read` and `x read + copy` divide the step's wall time by that of the
first two rows. Peak RSS is that of the step's process (for a pipeline, the largest
process in it). The MiB/s column is the model size divided by the wall time. The
model-refresh rows use a digest cache, as the pipeline's weights layer does. "one
PATCH" is the local target's upload: the files are read once and the layer streams in
one PATCH. "monolithic" is the Artifact Registry upload: one pass measures the layer,
a second one uploads it in one PUT. The second push finds the layer digest in the
cache, checks the registry with HEAD and uploads nothing.
"""


@dataclass(frozen=True)
class Result:
    step: str
    seconds: float
    peak_rss_mib: float
    uploaded_bytes: int | None = None
    note: str = ""


# --- generated model ----------------------------------------------------------------


def generate_model(folder: Path, total_bytes: int) -> list[Path]:
    """Write random F16 safetensors shards of at most SHARD_BYTES each."""
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, -(-total_bytes // SHARD_BYTES))
    shards = []
    for index in range(count):
        size = min(SHARD_BYTES, total_bytes - index * SHARD_BYTES)
        path = folder / f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        _write_shard(path, f"layers.{index}.weight", size)
        shards.append(path)
    return shards


def _write_shard(path: Path, name: str, total: int) -> None:
    header = json.dumps(
        {name: {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}}
    ).encode()
    data_bytes = total - 8 - len(header) - 8
    data_bytes -= data_bytes % 2
    header = json.dumps(
        {
            name: {
                "dtype": "F16",
                "shape": [data_bytes // 2],
                "data_offsets": [0, data_bytes],
            }
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        remaining = data_bytes
        while remaining:
            chunk = os.urandom(min(WRITE_CHUNK, remaining))
            out.write(chunk)
            remaining -= len(chunk)


# --- steps that run in a child process ----------------------------------------------


def step_read(files: list[Path]) -> dict[str, Any]:
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(4 * MIB):
                total += len(chunk)
    return {"bytes": total}


def step_copy(files: list[Path], registry: str) -> dict[str, Any]:
    """Stream the concatenated files as one blob: one PATCH with a streamed body, then
    a PUT with the digest computed on the way."""
    import httpx

    digest = hashlib.sha256()
    size = 0

    def body() -> Iterator[bytes]:
        nonlocal size
        for path in files:
            with open(path, "rb") as handle:
                while chunk := handle.read(4 * MIB):
                    digest.update(chunk)
                    size += len(chunk)
                    yield chunk

    base = f"http://{registry}/v2/bench/copy/blobs/uploads/"
    with httpx.Client(timeout=600) as client:
        started = client.post(base)
        location = str(started.request.url.join(started.headers["Location"]))
        patched = client.patch(
            location,
            content=body(),
            headers={"Content-Type": "application/octet-stream"},
        )
        patched.raise_for_status()
        location = str(patched.request.url.join(patched.headers["Location"]))
        separator = "&" if "?" in location else "?"
        final = client.put(f"{location}{separator}digest=sha256:{digest.hexdigest()}")
        final.raise_for_status()
    return {"bytes": size, "uploaded": size}


def step_build(
    files: list[Path],
    registry: str,
    compression: str,
    digest_cache: Path,
    single_patch: bool,
) -> dict[str, Any]:
    from tasks import oci

    layer = oci.Layer.from_files(
        {f"{MODEL_DIR}/{path.name}": path for path in files},
        compression=compression,  # type: ignore[arg-type]
        follow_symlinks=False,
    )
    # Like the pipeline's weights layer, this layer keeps its digests in a cache.
    layer.digest_cache = digest_cache
    with oci.RegistryClient(
        oci.local_endpoint(registry), single_patch_uploads=single_patch
    ) as client:
        image = oci.append_layers(
            BASE,
            [layer],
            "us-central1-docker.pkg.dev/bench/model/llm:bench",
            registry=client,
        )
        stats = client.stats
    return {
        "image": image,
        "uploaded": stats.bytes_uploaded,
        "layer_bytes": layer.digests().size,
    }


def step_push_file(path: Path, digest: str, registry: str) -> dict[str, Any]:
    from tasks import oci

    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as handle:
            while chunk := handle.read(oci.CHUNK_SIZE):
                yield chunk

    target = oci.ImageReference("us-central1-docker.pkg.dev", "bench/gnu/layer")
    with oci.RegistryClient(oci.local_endpoint(registry)) as client:
        client.push_blob(target, f"sha256:{digest}", size, chunks)
        return {"uploaded": client.stats.bytes_uploaded}


def run_child_step(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step")
    parser.add_argument("--registry", default="")
    parser.add_argument("--compression", default="none")
    parser.add_argument("--digest", default="")
    parser.add_argument("--digest-cache", type=Path, default=None)
    parser.add_argument("--monolithic", action="store_true")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    # Imports are not part of the step: they cost the same for any model size.
    import httpx  # noqa: F401

    from tasks import oci  # noqa: F401

    started = time.perf_counter()
    if args.step == "read":
        result = step_read(args.files)
    elif args.step == "copy":
        result = step_copy(args.files, args.registry)
    elif args.step == "build":
        result = step_build(
            args.files,
            args.registry,
            args.compression,
            args.digest_cache,
            not args.monolithic,
        )
    else:
        result = step_push_file(args.files[0], args.digest, args.registry)
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result))


# --- the parent: registry, peers, table ----------------------------------------------


# Linux carries a process's peak RSS across fork and exec, so a child started from this
# (large) process would report at least this process's size. A small launcher forks
# the command instead and reports the peak RSS that wait4 gives for it.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(command: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """Run `command`; return wall seconds, peak RSS in MiB and its stdout.

    For a pipeline the peak RSS is that of its largest process.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        started = time.perf_counter()
        process = subprocess.run(
            [sys.executable, "-S", "-c", LAUNCHER, rss_file.name, *command],
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            raise RuntimeError(
                f"{command[:3]} failed ({process.returncode}): {process.stderr}"
            )
        peak_kib = int(rss_file.read() or 0)
    return seconds, peak_kib / 1024, process.stdout


def launcher_floor_mib() -> float:
    """Peak RSS reported for `true`: what the launcher's fork adds to every step."""
    return measure(["true"])[1]


def python_step(step: str, files: list[Path], *extra: str) -> tuple[float, float, dict]:
    command = [sys.executable, __file__, "--child", step, *extra, *map(str, files)]
    wall, rss, stdout = measure(command, cwd=REPO_ROOT)
    result = json.loads(stdout.strip().splitlines()[-1])
    return result.get("seconds", wall), rss, result


class Registry:
    """A docker-registry with fresh storage for each step."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.count = 0
        self.process: Any = None

    def __enter__(self) -> str:
        from localcloud.registry import RegistryProcess

        self.count += 1
        self.process = RegistryProcess(self.workdir / f"registry-{self.count}")
        self.process.start()
        return str(self.process.address)

    def __exit__(self, *exc: object) -> None:
        self.process.stop()
        shutil.rmtree(self.process.root, ignore_errors=True)


def run_size(size_gib: float, workdir: Path, gnu_max_gib: float) -> list[Result]:
    folder = workdir / f"model-{size_gib:g}g"
    files = generate_model(folder, int(size_gib * GIB))
    registries = Registry(workdir)
    results = []

    seconds, rss, _ = python_step("read", files)
    results.append(Result("plain sequential read", seconds, rss))

    with registries as registry:
        seconds, rss, out = python_step("copy", files, "--registry", registry)
    results.append(Result("read + copy to the registry", seconds, rss, out["uploaded"]))

    for compression, upload in (
        ("none", "one PATCH"),
        ("zstd", "one PATCH"),
        ("zstd", "monolithic"),
    ):
        digest_cache = workdir / f"digests-{compression}-{upload[:3]}.json"
        with registries as registry:
            args = [
                "--registry",
                registry,
                "--compression",
                compression,
                "--digest-cache",
                str(digest_cache),
            ]
            if upload == "monolithic":
                args.append("--monolithic")
            seconds, rss, out = python_step("build", files, *args)
            results.append(
                Result(
                    f"model-refresh build + push ({compression}, {upload})",
                    seconds,
                    rss,
                    out["uploaded"],
                    f"layer {out['layer_bytes'] / MIB:.0f} MiB",
                )
            )
            if upload == "one PATCH" and compression == "zstd":
                seconds, rss, out = python_step("build", files, *args)
                results.append(
                    Result(
                        "model-refresh second push (zstd)",
                        seconds,
                        rss,
                        out["uploaded"],
                        "digest cache hit, HEAD only",
                    )
                )

    results.append(skopeo_copy(files, workdir, registries))
    if size_gib <= gnu_max_gib:
        results.append(gnu_tar_gzip_push(files, workdir, registries))
    else:
        note = f"not run: over --gnu-max-gib {gnu_max_gib:g}"
        results.append(Result("GNU tar + gzip -1 + push", NOT_RUN, NOT_RUN, None, note))
    shutil.rmtree(folder, ignore_errors=True)
    return results


def skopeo_copy(files: list[Path], workdir: Path, registries: Registry) -> Result:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        return Result("skopeo copy (not installed)", float("nan"), float("nan"))
    layout = workdir / "oci-layout"
    _write_oci_layout(files, layout)
    try:
        with registries as registry:
            seconds, rss, _ = measure(
                [
                    skopeo,
                    "copy",
                    "--quiet",
                    "--dest-tls-verify=false",
                    f"oci:{layout}:bench",
                    f"docker://{registry}/bench/skopeo/llm:bench",
                ]
            )
    finally:
        shutil.rmtree(layout, ignore_errors=True)
    return Result("skopeo copy of an OCI layout", seconds, rss, None, "gzip on push")


def _write_oci_layout(files: list[Path], layout: Path) -> None:
    """Write an OCI image layout holding the uncompressed weights layer (not timed)."""
    from tasks import oci

    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer = oci.Layer.from_files(
        {f"{MODEL_DIR}/{path.name}": path for path in files}, compression="none"
    )
    digests = layer.digests()
    with open(blobs / digests.digest.removeprefix("sha256:"), "wb") as out:
        for chunk in layer.chunks():
            out.write(chunk)
    config = oci.canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digests.diff_id]},
        }
    )
    config_digest = hashlib.sha256(config).hexdigest()
    (blobs / config_digest).write_bytes(config)
    manifest = oci.canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": {
                "mediaType": oci.OCI_CONFIG,
                "digest": f"sha256:{config_digest}",
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": layer.media_type,
                    "digest": digests.digest,
                    "size": digests.size,
                }
            ],
        }
    )
    manifest_digest = hashlib.sha256(manifest).hexdigest()
    (blobs / manifest_digest).write_bytes(manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": oci.OCI_MANIFEST,
                "digest": f"sha256:{manifest_digest}",
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "bench"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def gnu_tar_gzip_push(files: list[Path], workdir: Path, registries: Registry) -> Result:
    staging = workdir / "tar-root"
    model = staging / MODEL_DIR.lstrip("/")
    model.mkdir(parents=True)
    for path in files:
        os.link(path, model / path.name)
    archive = workdir / "layer.tar.gz"
    digest_file = workdir / "layer.sha256"
    pipeline = (
        "set -o pipefail; "
        f"tar -C {staging} --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner "
        f"-cf - models | gzip -1 | tee {archive} | sha256sum > {digest_file}"
    )
    try:
        tar_seconds, tar_rss, _ = measure(["bash", "-c", pipeline])
        digest = digest_file.read_text().split()[0]
        with registries as registry:
            push_seconds, push_rss, out = python_step(
                "push-file", [archive], "--registry", registry, "--digest", digest
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)
        digest_file.unlink(missing_ok=True)
    return Result(
        "GNU tar + gzip -1 + push",
        tar_seconds + push_seconds,
        max(tar_rss, push_rss),
        out["uploaded"],
        f"tar+gzip {tar_seconds:.1f} s, push {push_seconds:.1f} s",
    )


# --- report -------------------------------------------------------------------------


def machine() -> list[str]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {memory_kib / 1024**2:.0f} GiB",
        f"- OS: {platform.platform()}; Python {platform.python_version()}",
        f"- registry: {_version(['docker-registry', '--version'])}, filesystem "
        "storage on the same disk as the files",
        f"- peak RSS of `true` measured the same way as the steps: "
        f"{launcher_floor_mib():.1f} MiB (every peak RSS below is at least this)",
        f"- skopeo: {_version(['skopeo', '--version'])}; "
        f"GNU tar: {_version(['tar', '--version'])}; "
        f"gzip: {_version(['gzip', '--version'])}",
    ]
    return lines


def _version(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        return "not installed"
    output = subprocess.run(command, capture_output=True, text=True).stdout
    return output.splitlines()[0].strip() if output else "unknown"


def table(size_gib: float, results: list[Result], command: str) -> list[str]:
    read = results[0].seconds
    copy = results[1].seconds
    total = int(size_gib * GIB)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### {size_gib:g} GiB of safetensors",
        "",
        f"Measured by `{command}`, finished {now}. Load average at the end: {load}.",
        "",
        "| step | wall (s) | MiB/s of model | peak RSS (MiB) | x read | x read + copy "
        "| layer bytes uploaded | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        uploaded = "" if result.uploaded_bytes is None else f"{result.uploaded_bytes:,}"
        if math.isnan(result.seconds):
            lines.append(f"| {result.step} | | | | | | | {result.note} |")
            continue
        lines.append(
            f"| {result.step} | {result.seconds:.2f} | "
            f"{total / MIB / result.seconds:.0f} | {result.peak_rss_mib:.0f} | "
            f"{result.seconds / read:.2f} | {result.seconds / copy:.2f} | "
            f"{uploaded} | {result.note} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        run_child_step(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[1, 4], help="model sizes in GiB"
    )
    parser.add_argument(
        "--gnu-max-gib",
        type=float,
        default=math.inf,
        help="largest size in GiB for the GNU tar + gzip peer, which is the slowest",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the tables of other sizes that the page already has",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "docs" / "benchmarks.md",
        help="markdown page to write",
    )
    args = parser.parse_args(argv)

    command = " ".join([".venv/bin/python", "scripts/benchmark.py", *argv])
    sections: dict[float, list[str]] = {}
    if args.append and args.output.is_file():
        sections = read_sections(args.output.read_text())
    with tempfile.TemporaryDirectory(prefix="model-refresh-bench-", dir="/tmp") as tmp:
        for size in args.sizes:
            print(f"benchmarking {size:g} GiB ...", flush=True)
            results = run_size(size, Path(tmp), args.gnu_max_gib)
            sections[size] = table(size, results, command)
            print("\n".join(sections[size]), flush=True)
            # Written after each size, so a long run leaves the finished tables.
            write_page(args.output, sections)
    return 0


def read_sections(page: str) -> dict[float, list[str]]:
    """Return the tables of an existing page by model size."""
    sections: dict[float, list[str]] = {}
    for chunk in page.split("\n### ")[1:]:
        size = float(chunk.split(" ", 1)[0])
        sections[size] = ("### " + chunk).rstrip("\n").splitlines()
    return sections


def write_page(output: Path, sections: dict[float, list[str]]) -> None:
    lines = [
        "# Benchmarks: weights build and push",
        "",
        "Written by `scripts/benchmark.py`; each table names the command that measured",
        "it. Do not edit by hand: rerun the script, which needs",
        "`apt-get install docker-registry skopeo`.",
        "",
        "## Machine",
        "",
        *machine(),
        "",
        "## How to read the tables",
        "",
        *EXPLANATION.strip().splitlines(),
        "",
    ]
    for size in sorted(sections):
        lines += [*sections[size], ""]
    output.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
