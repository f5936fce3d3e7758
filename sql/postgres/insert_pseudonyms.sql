-- Record pseudonym pairs: psycopg2.extras.execute_values fills the VALUES placeholder with
-- (pseudonym, user_id) rows. A pair already recorded is kept as is.
INSERT INTO {schema}.user_pseudonyms (pseudonym, user_id)
VALUES %s
ON CONFLICT (pseudonym) DO NOTHING
