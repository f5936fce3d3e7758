"""Layer 1, landing files to a validated lake: column mapping, readers, ingest with its
manifest and event-id index, the run's point-in-time snapshot, validation, the window check,
and the demo data sources. Imports only :mod:`pipeline.core`."""
