-- Record one pseudonym pair; a pair already recorded is kept as is.
INSERT OR IGNORE INTO user_pseudonyms (pseudonym, user_id) VALUES (:pseudonym, :user_id)
