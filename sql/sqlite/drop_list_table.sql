-- Drops one version table. Placeholder: table (a quoted identifier built from the catalog).
DROP TABLE IF EXISTS {table}
