"""Runs `python -m shortfin_apps.llm.server ARGS` (in shortfin's environment) with one fix:
shortfin 3.9.0 answers `"return_input_ids": true` by handing a Python list to starlette's
Response, which cannot encode it (the request never completes). Here such a payload is sent
as JSON, so tests read the generated token ids. Nothing else changes."""

import json
import runpy

from shortfin.interop import fastapi as sf_fastapi

_send = sf_fastapi.FastAPIResponder.send_response


def send_response(self, response):
    if isinstance(response, (list, dict)):
        response = json.dumps(response, default=int).encode()
    return _send(self, response)


sf_fastapi.FastAPIResponder.send_response = send_response
runpy.run_module("shortfin_apps.llm.server", run_name="__main__", alter_sys=True)
