-- Parameters: since (ISO text or NULL). Oldest day first.
SELECT day, cutoff, model_version, variant,
       users_served, users_active, impressions, clicks,
       ctr, engaged_users, engaged_share, converted_users,
       conversion, revenue, revenue_per_active, impressions_top3,
       clicks_top3, ctr_top3, engaged_users_top3, engaged_share_top3,
       converted_users_top3, conversion_top3, revenue_top3, revenue_per_active_top3,
       computed_as_of
FROM impact
WHERE (:since IS NULL OR day >= :since)
ORDER BY day, model_version, variant
