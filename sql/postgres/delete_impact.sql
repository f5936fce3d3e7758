-- Parameters: start, end. An impact run replaces the days it attributed.
DELETE FROM {schema}.impact WHERE day >= %(start)s AND day < %(end)s
