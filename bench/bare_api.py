"""The bare endpoint the HTTP benchmark compares against: the same framework and server, the same
request body parsed as JSON, no validation, no database, no Redis."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

app = FastAPI()


@app.post("/v1/submissions", status_code=202)
def submit(body: dict[str, Any] = Body()) -> Any:  # noqa: B008
    sid = str(uuid.uuid4())
    return JSONResponse(
        {"id": sid, "state": "received", "status_url": f"/v1/submissions/{sid}"}, status_code=202
    )
