"""Server-rendered dashboard: runs, live curves (SSE), sensitivity histogram, most/least sensitive examples."""

from app.dashboard.routes import router

__all__ = ["router"]
