"""Layer 0, what every other layer speaks: settings, the event schema, errors, the numerics
pin, stage timing, log routing and the ranking metrics. Imports nothing else of pipeline."""
