-- One published version of the recommendation lists. Placeholders: schema, table (identifiers).
-- model_version, variant and experiment are stored per row only while an experiment runs (or a
-- row comes from another model version than the publish's); otherwise they stay NULL and are
-- not part of the COPY: the view supplies the version's model_version and generated_at as
-- constants (swap_view.sql) instead of storing them in every row (a third less to parse).
-- user_id uses the "C" collation (byte order): the (user_id, rank) index builds with memcmp and
-- abbreviated keys instead of locale-aware comparisons; CMS equality lookups are unchanged.
CREATE TABLE {schema}.{table} (
    user_id        text COLLATE "C" NOT NULL,
    rank           smallint    NOT NULL CHECK (rank >= 1),
    item_id        text        NOT NULL,
    score          real,
    reason         text,
    source         text,
    model_version  text,
    variant        text,
    experiment     text,
    CHECK ((variant IS NULL) = (experiment IS NULL))
);
