-- Points the view at a new version table; pipeline.serving runs these statements and
-- mark_live.sql inside one BEGIN IMMEDIATE transaction (SQLite DDL is transactional, and WAL
-- readers keep their snapshot). Placeholders: view, table (quoted identifiers).
DROP VIEW IF EXISTS {view};

CREATE VIEW {view} AS
SELECT user_id, rank, item_id, score, reason, source, model_version, generated_at
FROM {table};
