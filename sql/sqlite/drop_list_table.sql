-- Drops one version's tables (the lists and their assignments). Placeholders: table,
-- assignments (quoted identifiers built from the catalog).
DROP TABLE IF EXISTS {table};
DROP TABLE IF EXISTS {assignments};
