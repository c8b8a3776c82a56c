-- The latest job runs: what ran, how it ended, rows in and out, errors and seconds (the full
-- settings of each run are in runs.config_json).
-- param limit = 50
SELECT
    job,
    status,
    rows_in,
    rows_out,
    errors,
    round(seconds, 2) AS seconds,
    strftime(started_at, '%Y-%m-%d %H:%M:%S') AS started_at,
    run_id,
    message
FROM runs
ORDER BY runs.started_at DESC NULLS LAST
LIMIT $limit;
