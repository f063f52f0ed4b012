"""HTTP serving (`perm serve`): needs the serve extra (fastapi, uvicorn)."""
