"""Pure policy: selectors, verdicts, naming, allocation and desired state. No I/O here."""
