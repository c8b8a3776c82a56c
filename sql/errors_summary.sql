-- What went wrong, where: error rows per job and stage, with the most common reasons.
-- Use it after an ingest to see which inputs were skipped and why (every good row was kept).
SELECT
    job,
    stage,
    count(*) AS errors,
    count(DISTINCT run_id) AS runs,
    mode(regexp_replace(reason, '[0-9]+', 'N', 'g')) AS most_common_reason,
    min(source_uri) AS example_source
FROM errors
GROUP BY job, stage
ORDER BY errors DESC;
