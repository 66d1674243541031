"""One process for the pipeline runs of the fault tests (test_s3_faults, test_disk_full).

The runs share one Ray: in separate processes each would pay 30 to 60 s to start on this machine.
The process lives in a user + mount namespace where one can be made, so the disk-full test can mount
a small tmpfs that the stage's Ray workers see. Its S3 endpoint is the faulty proxy in front of
moto_server, started first because Ray's workers take their environment from that process.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest
from cli import ROOT, clean_env
from cli_session import SMALL_DATA, CliSession, artifact_files, file_digests
from faulty_s3_proxy import FaultPolicy, faulty_proxy
from s3_server import moto_s3

BUCKET = "reliability"
HELPERS = ROOT / "tests" / "helpers"


@dataclass(frozen=True)
class FaultyS3:
    endpoint: str
    """The proxy's URL: what the pipeline runs reach."""
    bucket: str
    policy: FaultPolicy
    fs: Any
    """An s3fs filesystem on moto_server itself (no faults), for the tests' own checks."""


@pytest.fixture(scope="session")
def faulty_s3():
    policy = FaultPolicy()
    with moto_s3(BUCKET) as server, faulty_proxy(server.endpoint, policy) as endpoint:
        yield FaultyS3(endpoint, BUCKET, policy, server.fs)


@pytest.fixture(scope="session")
def cli_session(tmp_path_factory, faulty_s3):
    """A `CliSession` (in a mount namespace when possible); `.can_mount` says whether its shell
    steps can mount a tmpfs, `.why_not` why they cannot."""
    cwd = tmp_path_factory.mktemp("cli-session")
    env = clean_env()
    env.update(
        PYTHONPATH=f"{ROOT}:{HELPERS}",
        AWS_ACCESS_KEY_ID="faulty-proxy-key",
        AWS_SECRET_ACCESS_KEY="faulty-proxy-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=faulty_s3.endpoint,
        FSSPEC_S3_ENDPOINT_URL=faulty_s3.endpoint,
    )
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError as err:  # no util-linux
        probe = subprocess.CompletedProcess(err.filename, 127, "", str(err))
    session = CliSession(cwd, env, namespace=probe.returncode == 0)
    session.can_mount, session.why_not = False, f"unshare --user --map-root-user --mount: {probe.stderr.strip()}"
    if probe.returncode == 0:
        (cwd / "probe").mkdir()
        mounted = session.sh(f"mount -t tmpfs -o size=64k tmpfs {cwd / 'probe'} && umount {cwd / 'probe'}")
        session.can_mount, session.why_not = mounted["rc"] == 0, f"mount -t tmpfs: {mounted['output'].strip()}"
    yield session
    session.close()


@dataclass(frozen=True)
class Undisturbed:
    files: dict[str, str]
    """{path in the artifact: sha256}, the manifest left out."""
    manifest: dict


@pytest.fixture(scope="session")
def undisturbed_data(cli_session, tmp_path_factory) -> Undisturbed:
    """The data artifact of `SMALL_DATA` run without any fault (local root): what every disturbed
    run must end up with. The artifact does not depend on the root it is written to."""
    place = tmp_path_factory.mktemp("undisturbed")
    result = cli_session.run(
        "run", *SMALL_DATA, f"artifacts.root={place / 'root'}", f"artifacts.local_root={place / 'local'}"
    )
    assert result["rc"] == 0, result["stdout"] + result["stderr"]
    directory, files = artifact_files(file_digests(place / "root"))
    return Undisturbed(files, json.loads((place / "root" / directory / "manifest.json").read_text()))
