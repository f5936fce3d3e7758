-- Upgrades a view recommendations from before experiments (pipeline.serving.sqlite, inside the
-- migration transaction, only when the view lacks variant): the same live table, the same
-- eight columns (stored per row in SQLite), then variant and experiment as NULL. The next
-- publish's swap points the view at a table that stores them. Placeholders: view, table.
DROP VIEW IF EXISTS {view};

CREATE VIEW {view} AS
SELECT user_id, rank, item_id, score, reason, source, model_version, generated_at,
       CAST(NULL AS TEXT) AS variant, CAST(NULL AS TEXT) AS experiment
FROM {table};
