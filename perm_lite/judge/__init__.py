"""The teacher path: label records PERM's way with an LLM judge (`perm judge`)."""
