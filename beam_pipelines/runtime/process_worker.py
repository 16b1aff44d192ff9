"""A Python SDK worker's boot for Beam's PROCESS environment, in place of the Go `boot` binary that Beam's
SDK container ships (the wheel has none): a runner such as Flink's starts one worker process per
environment with

    COMMAND --id=ID --provision_endpoint=HOST:PORT --logging_endpoint=... --artifact_endpoint=...
            --control_endpoint=... [--semi_persist_dir=DIR]

and this module does what the Go boot does for a worker whose packages are installed already: fetch the
provision info (the pipeline options, the endpoints, the runner's capabilities), then `exec` Beam's
`sdk_worker_main` with them in the environment it reads. Staged artifacts are not installed: the worker
runs in the venv that holds Beam and bft (`--environment_config '{"command": ".../beam_worker_boot"}'`,
written by scripts/flink_local.py). Each TaskManager starts and ends its own workers, which an EXTERNAL
worker pool shared by several TaskManagers cannot do: their worker ids repeat across TaskManagers, and
the pool's StopWorker for one TaskManager's id ends the other's worker (a job then waits forever).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def provision(endpoint: str, worker_id: str):
    """The provision info of this worker's job (Beam's ProvisionService)."""
    import grpc
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        return stub.GetProvisionInfo(beam_provision_api_pb2.GetProvisionInfoRequest(),
                                     metadata=[("worker_id", worker_id)], timeout=60).info


def harness_environment(args, info) -> dict[str, str]:
    """The variables `sdk_worker_main.create_harness` reads, as the Go boot sets them."""
    from google.protobuf import json_format, text_format
    from apache_beam.portability.api import endpoints_pb2

    def descriptor(url: str) -> str:
        return text_format.MessageToString(endpoints_pb2.ApiServiceDescriptor(url=url))

    env = {
        "WORKER_ID": args.id,
        "PIPELINE_OPTIONS": json.dumps(json_format.MessageToDict(info.pipeline_options)),
        "LOGGING_API_SERVICE_DESCRIPTOR": descriptor(info.logging_endpoint.url or args.logging_endpoint),
        "CONTROL_API_SERVICE_DESCRIPTOR": descriptor(info.control_endpoint.url or args.control_endpoint),
        "RUNNER_CAPABILITIES": " ".join(info.runner_capabilities),
    }
    if info.status_endpoint.url:
        env["STATUS_API_SERVICE_DESCRIPTOR"] = descriptor(info.status_endpoint.url)
    if args.semi_persist_dir:
        env["SEMI_PERSISTENT_DIRECTORY"] = args.semi_persist_dir
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("id", "provision_endpoint", "logging_endpoint", "artifact_endpoint", "control_endpoint"):
        parser.add_argument(f"--{flag}", required=flag in ("id", "provision_endpoint"), default="")
    parser.add_argument("--semi_persist_dir", default="")
    args, _ = parser.parse_known_args(argv)
    info = provision(args.provision_endpoint, args.id)
    os.environ.update(harness_environment(args, info))
    os.execv(sys.executable, [sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"])


if __name__ == "__main__":
    main()
