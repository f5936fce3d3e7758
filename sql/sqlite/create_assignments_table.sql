-- The experiment assignments of one published version (see
-- sql/postgres/create_assignments_table.sql): created, loaded and indexed in the same
-- transaction as the list table, swapped and dropped with it; empty without an experiment.
-- Placeholders: assignments, index (quoted identifiers).
CREATE TABLE {assignments} (
    user_id     TEXT NOT NULL,
    experiment  TEXT NOT NULL,
    variant     TEXT NOT NULL
);
