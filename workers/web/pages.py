"""The reference page for a campaign (``/demo/SLUG``) and its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).resolve().parent / "static"
router = APIRouter()


@router.get("/demo/{slug}", response_class=HTMLResponse, include_in_schema=False)
def demo_page(slug: str) -> Any:
    return FileResponse(STATIC / "demo.html", media_type="text/html")


@router.get("/static/{name}", include_in_schema=False)
def static(name: Literal["demo.js", "demo.css"]) -> Any:
    media = "text/javascript" if name.endswith(".js") else "text/css"
    return FileResponse(STATIC / name, media_type=media)
