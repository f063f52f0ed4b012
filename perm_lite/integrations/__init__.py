"""Adapters for the programs perm-lite is embedded in (TRL, ...); each needs its own extra."""
