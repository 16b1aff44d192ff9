"""gcp-storage-emulator with GCS's generation preconditions: `python tests/gcs_emulator.py start ...`
takes the emulator's own arguments.

The stock emulator ignores `ifGenerationMatch` and `ifGenerationNotMatch` (a create with
`if_generation_match=0` overwrites an existing object, a delete with a stale generation succeeds),
so a test of code that relies on them (storage.lock on gs://) would pass whatever the code does.
Here every object request that carries one is checked against the object's current generation (0
when it does not exist) and answered 412 Precondition Failed when it does not hold, as GCS does. The
emulator serves one request at a time, so the check and the write are atomic.
"""
from __future__ import annotations

import functools
import sys
from http import HTTPStatus


def _install() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def object_name(request):
        params = request.params or {}
        if params.get("object_id"):
            return params["object_id"]
        if request.query.get("name"):
            return request.query["name"][0]
        data = request.data
        if isinstance(data, dict):
            return (data.get("meta") or {}).get("name") or data.get("name")
        return None

    def guarded(handler):
        @functools.wraps(handler)
        def run(request, response, storage, *args, **kwargs):
            match = request.query.get("ifGenerationMatch")
            not_match = request.query.get("ifGenerationNotMatch")
            if match or not_match:
                bucket, name = (request.params or {}).get("bucket_name"), object_name(request)
                try:
                    current = int(storage.get_file_obj(bucket, name)["generation"])
                except NotFound:
                    current = 0
                if (match and int(match[0]) != current) or (not_match and int(not_match[0]) == current):
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "At least one of the pre-conditions "
                                             "you specified did not hold.",
                                             "errors": [{"reason": "conditionNotMet"}]}})
                    return None
            return handler(request, response, storage, *args, **kwargs)
        return run

    wrapped = {}
    for name in ("insert", "delete", "download", "get", "patch", "upload_partial"):
        original = getattr(objects, name)
        wrapped[original] = guarded(original)
        setattr(objects, name, wrapped[original])
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in wrapped:
                handlers[method] = wrapped[handler]


def main(argv: list[str]) -> None:
    _install()
    from gcp_storage_emulator.__main__ import main as emulator_main

    emulator_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
