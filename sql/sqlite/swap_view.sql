-- Points the views at a new version (recommendations at its list table,
-- recommendation_assignments at its assignments table); pipeline.serving runs these statements
-- and mark_live.sql inside one BEGIN IMMEDIATE transaction (SQLite DDL is transactional, and
-- WAL readers keep their snapshot). variant and experiment come after the original eight
-- columns. Placeholders: view, assignments_view, table, assignments (quoted identifiers).
DROP VIEW IF EXISTS {view};

CREATE VIEW {view} AS
SELECT user_id, rank, item_id, score, reason, source, model_version, generated_at, variant,
       experiment
FROM {table};

DROP VIEW IF EXISTS {assignments_view};

CREATE VIEW {assignments_view} AS
SELECT user_id, experiment, variant
FROM {assignments};
