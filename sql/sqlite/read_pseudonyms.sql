-- Every pseudonym pair.
SELECT pseudonym, user_id FROM user_pseudonyms
