"""kopf handlers (registered on import). Thin: they read kopf's indexes, call the pure
functions in hostdev.policy and write the difference."""
