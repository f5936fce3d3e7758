-- One published version of the recommendation lists. Placeholders: schema, table (identifiers).
-- model_version and generated_at are one value per version: the view supplies them as constants
-- (swap_view.sql) instead of storing them in every row (a third less to parse in the COPY).
-- user_id uses the "C" collation (byte order): the (user_id, rank) index builds with memcmp and
-- abbreviated keys instead of locale-aware comparisons; CMS equality lookups are unchanged.
CREATE TABLE {schema}.{table} (
    user_id        text COLLATE "C" NOT NULL,
    rank           smallint    NOT NULL CHECK (rank >= 1),
    item_id        text        NOT NULL,
    score          real,
    reason         text,
    source         text
);
