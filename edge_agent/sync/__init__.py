"""Offline-first sync: the outbox, conflict rules, and (later) the hub client loops."""
