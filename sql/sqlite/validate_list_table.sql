-- Checks one loaded version table before it goes live. Parameter: default_user.
-- One row: n_rows, n_users, default_rows, bad_rank_users (+ first example),
-- dup_item_users (+ first example). Ranks must be 1..N, contiguous, per user.
WITH per_user AS (
    SELECT user_id,
           count(*)                AS n,
           min(rank)               AS min_rank,
           max(rank)               AS max_rank,
           count(DISTINCT rank)    AS distinct_ranks,
           count(DISTINCT item_id) AS distinct_items
    FROM {table}
    GROUP BY user_id
)
SELECT coalesce(sum(n), 0)                                                    AS n_rows,
       count(*)                                                               AS n_users,
       coalesce(sum(n) FILTER (WHERE user_id = :default_user), 0)             AS default_rows,
       count(*) FILTER (WHERE min_rank <> 1 OR max_rank <> n OR distinct_ranks <> n)
                                                                              AS bad_rank_users,
       min(user_id) FILTER (WHERE min_rank <> 1 OR max_rank <> n OR distinct_ranks <> n)
                                                                              AS first_bad_rank_user,
       count(*) FILTER (WHERE distinct_items <> n)                            AS dup_item_users,
       min(user_id) FILTER (WHERE distinct_items <> n)                        AS first_dup_item_user
FROM per_user
