-- One published version of the recommendation lists. Placeholders: schema, table (identifiers).
-- Columns match the view contract; keep the order (CREATE OR REPLACE VIEW only appends columns).
CREATE TABLE {schema}.{table} (
    user_id        text        NOT NULL,
    rank           smallint    NOT NULL CHECK (rank >= 1),
    item_id        text        NOT NULL,
    score          real,
    reason         text,
    source         text,
    model_version  text        NOT NULL,
    generated_at   timestamptz NOT NULL
);
