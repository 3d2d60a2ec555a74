"""Fixtures of the relay tests (defined in relayhelp.py)."""

from relayhelp import provider, provider_store

__all__ = ["provider", "provider_store"]
