"""S3 faults during a pipeline run: throttling and 5xx are retried; revoked credentials stop the run
with an error naming the S3 operation and path, and never leave a manifest for a partial artifact.

The runs reach moto_server through `faulty_s3_proxy` (see conftest.py), which answers every
`FAIL_EVERY`-th request with a 503 SlowDown or a 500 InternalError instead of forwarding it, and,
once revoked, every request with a 403 InvalidAccessKeyId. Two runs of the data stage to the same
root: one whose credentials are revoked while the artifact is uploaded (the 5xx injected too), and
the same command once they are valid again (the 5xx still injected). Both are compared with an
undisturbed run's artifact (conftest.py).
"""

from __future__ import annotations

import hashlib
import json

import pytest
from cli_session import SMALL_DATA

pytestmark = [pytest.mark.slow, pytest.mark.faults]
FAIL_EVERY = 6
"""One request in six (GET, HEAD, PUT, POST, DELETE alike) fails once."""
REVOKE_AFTER_PUTS = 12
"""Two PUTs before the stage (the writability probe and the run record), then ten files of the
artifact's 28: the credentials go while the upload is under way."""


@pytest.fixture(scope="module")
def runs(cli_session, faulty_s3, tmp_path_factory):
    local = tmp_path_factory.mktemp("s3-local")
    policy, root = faulty_s3.policy, f"{faulty_s3.bucket}/faulty"
    words = ["run", *SMALL_DATA, f"artifacts.root=s3://{root}", f"artifacts.local_root={local}"]

    def run() -> dict:
        result = cli_session.run(*words)
        return {**result, "faults": policy.stats(), "objects": faulty_s3.fs.find(f"{root}/data")}

    policy.reset(fail_every=FAIL_EVERY, revoke_after_puts=REVOKE_AFTER_PUTS)
    revoked = run()
    policy.reset(fail_every=FAIL_EVERY)  # credentials valid again; the 5xx go on
    rerun = run()
    policy.reset()
    return {"revoked": revoked, "rerun": rerun}


def _artifact(s3) -> tuple[dict[str, str], dict]:
    """The data artifact in the bucket: {path in the artifact: sha256} but the manifest, and the manifest."""
    (manifest,) = s3.fs.glob(f"{s3.bucket}/faulty/data/*/manifest.json")
    directory = manifest.removesuffix("manifest.json")
    files = {path[len(directory) :]: hashlib.sha256(s3.fs.cat_file(path)).hexdigest() for path in s3.fs.find(directory)}
    del files["manifest.json"]
    return files, json.loads(s3.fs.cat_file(manifest))


def _report(record_property, name: str, run: dict) -> None:
    faults = run["faults"]
    record_property(f"{name}_faults", faults)
    print(
        f"\n{name} ({run['seconds']:.1f} s): {faults.get('requests', 0)} requests, "
        f"{faults.get('injected', 0)} faults injected ({faults.get('injected_503', 0)} SlowDown 503, "
        f"{faults.get('injected_500', 0)} InternalError 500), {faults.get('retries_survived', 0)} retried "
        f"successfully, {faults['lost']} lost, {faults.get('denied', 0)} denied after revocation"
    )


def test_throttling_and_5xx_are_retried_and_the_artifact_is_the_undisturbed_runs(
    runs, faulty_s3, undisturbed_data, record_property
):
    rerun = runs["rerun"]
    assert rerun["rc"] == 0, rerun["stdout"] + rerun["stderr"]
    faults = rerun["faults"]
    assert faults["injected"] >= 8 and faults["injected_503"] and faults["injected_500"], faults
    assert faults["retries_survived"] == faults["injected"] and faults["lost"] == 0, faults

    files, manifest = _artifact(faulty_s3)
    assert files == undisturbed_data.files  # byte for byte, every file
    assert len([name for name in files if "/shard-" in name]) == 15
    assert manifest["content_digest"] == undisturbed_data.manifest["content_digest"]
    _report(record_property, "5xx", rerun)


def test_revoked_credentials_stop_the_run_naming_the_s3_operation_and_leave_no_manifest(
    runs, faulty_s3, undisturbed_data, record_property
):
    revoked = runs["revoked"]
    assert revoked["rc"] == 1, revoked["stdout"] + revoked["stderr"]
    assert revoked["faults"]["revoked_after_puts"] >= REVOKE_AFTER_PUTS and revoked["faults"]["denied"]
    error = next(line for line in revoked["stderr"].splitlines() if line.startswith("stage data failed"))
    assert "StorageError: S3 " in error and f"s3://{faulty_s3.bucket}/faulty/data/" in error, error
    assert "InvalidAccessKeyId, HTTP 403" in error and "Access was denied: check the credentials" in error, error
    assert "Traceback" not in revoked["stderr"]
    # the run record could not be marked failed either (same credentials): a warning, not a traceback
    assert "warning: the run record was not updated: S3 write of" in revoked["stderr"]

    # a partial upload, and no manifest for it: not an artifact
    partial = revoked["objects"]
    assert partial and not [path for path in partial if path.endswith("manifest.json")], partial
    # the same command once the credentials are valid again: the artifact of an undisturbed run
    assert runs["rerun"]["rc"] == 0, runs["rerun"]["stdout"] + runs["rerun"]["stderr"]
    files, _ = _artifact(faulty_s3)
    assert files == undisturbed_data.files
    record_property("revoked_error", error)
    _report(record_property, "revoked", revoked)
    print(f"{error}\npartial upload left without a manifest: {len(partial)} of {len(files) + 1} files")
