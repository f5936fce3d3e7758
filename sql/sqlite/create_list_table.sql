-- One published version of the recommendation lists. Placeholder: table (a quoted identifier
-- that pipeline.serving builds from the catalog version number). variant and experiment are
-- NULL outside an experiment.
CREATE TABLE {table} (
    user_id        TEXT    NOT NULL,
    rank           INTEGER NOT NULL CHECK (rank BETWEEN 1 AND 32767),
    item_id        TEXT    NOT NULL,
    score          REAL,
    reason         TEXT,
    source         TEXT,
    model_version  TEXT    NOT NULL,
    generated_at   TEXT    NOT NULL,
    variant        TEXT,
    experiment     TEXT,
    CHECK ((variant IS NULL) = (experiment IS NULL))
);
