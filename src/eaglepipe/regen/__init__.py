"""Regeneration of assistant turns by the target: client, backends, resumable shard store."""
