-- Every pseudonym pair, streamed with COPY ... TO STDOUT (CSV).
COPY (SELECT pseudonym, user_id FROM {schema}.user_pseudonyms) TO STDOUT WITH (FORMAT csv)
