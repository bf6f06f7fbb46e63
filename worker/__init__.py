"""The wan-worker daemon: database, claim/lease, the worker loop, signals and the CLI."""
