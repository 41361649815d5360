"""kopf operator (imported as hostdev.operator; never a top-level `operator`)."""
