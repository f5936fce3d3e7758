-- Parameters: start, end (ISO text). An impact run replaces the days it attributed.
DELETE FROM impact WHERE day >= :start AND day < :end
