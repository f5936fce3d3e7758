-- The experiment assignments of one published version: every user of the lists that a running
-- experiment put in a variant (holdout users included: they have an assignment and no list).
-- Created, loaded and indexed in the same transaction as the version's list table, swapped
-- with it (swap_view.sql) and dropped with it. Empty when no experiment runs.
-- Placeholders: schema, assignments (identifiers).
CREATE TABLE {schema}.{assignments} (
    user_id     text COLLATE "C" NOT NULL,
    experiment  text NOT NULL,
    variant     text NOT NULL
);
