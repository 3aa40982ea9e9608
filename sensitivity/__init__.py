"""sensitivity package."""
