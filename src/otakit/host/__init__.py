"""Operator-side tools: deploy client (and later push, subscriber)."""
