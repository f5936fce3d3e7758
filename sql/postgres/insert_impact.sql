-- Parameters: one impact row (see 005_impact.sql).
INSERT INTO {schema}.impact
       (day, cutoff, model_version, variant,
       users_served, users_active, impressions, clicks,
       ctr, engaged_users, engaged_share, converted_users,
       conversion, revenue, revenue_per_active, impressions_top3,
       clicks_top3, ctr_top3, engaged_users_top3, engaged_share_top3,
       converted_users_top3, conversion_top3, revenue_top3, revenue_per_active_top3,
       computed_as_of)
VALUES (%(day)s, %(cutoff)s, %(model_version)s, %(variant)s, %(users_served)s,
        %(users_active)s, %(impressions)s, %(clicks)s, %(ctr)s, %(engaged_users)s,
        %(engaged_share)s, %(converted_users)s, %(conversion)s, %(revenue)s,
        %(revenue_per_active)s, %(impressions_top3)s, %(clicks_top3)s, %(ctr_top3)s,
        %(engaged_users_top3)s, %(engaged_share_top3)s, %(converted_users_top3)s,
        %(conversion_top3)s, %(revenue_top3)s, %(revenue_per_active_top3)s, %(computed_as_of)s)
