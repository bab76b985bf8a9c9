"""analytics routes (CONTRACT §3). Filled in by the analytics work."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["analytics"])
