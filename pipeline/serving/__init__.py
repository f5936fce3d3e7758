"""Layer 5, what the CMS reads: the business rules and the versioned serving store
(PostgreSQL, or the embedded SQLite file). Imports only the layers below."""
