-- What changed between two scans a and b (`fbmem sql scan_diff --param a=SCAN --param b=SCAN`):
--   label changed   generations whose label (most-severe) differs between the end of a and the end of b
--   new pair        VM / FM / BM pairs first scored by a job of scan b
--   newly detected  prompts NeMo found memorized in scan b and not in any run before the end of a
-- The label of a generation at the end of a scan is its latest `label_changes` row written by then
-- (a scan still running ends "now"). Generations labelled only after a are listed with label_a NULL.
-- param a = ''
-- param b = ''
WITH ends AS (
    SELECT scan_id, coalesce(finished_at, now()) AS ended FROM scans WHERE scan_id IN ($a, $b)
),
end_a AS (SELECT ended FROM ends WHERE scan_id = $a),
end_b AS (SELECT ended FROM ends WHERE scan_id = $b),
state_a AS (
    SELECT generation_id, arg_max(label, changed_at) AS label
    FROM label_changes WHERE rule = 'most-severe' AND changed_at <= (SELECT ended FROM end_a)
    GROUP BY generation_id
),
state_b AS (
    SELECT generation_id, arg_max(label, changed_at) AS label, arg_max(best_image_id, changed_at) AS image_id
    FROM label_changes WHERE rule = 'most-severe' AND changed_at <= (SELECT ended FROM end_b)
    GROUP BY generation_id
),
runs_b AS (SELECT run_id FROM runs WHERE scan_id = $b),
changed AS (
    SELECT 'label changed' AS change, b.generation_id, g.prompt_id, b.image_id,
           a.label AS label_a, b.label AS label_b, NULL::DOUBLE AS score
    FROM state_b AS b
    LEFT JOIN state_a AS a USING (generation_id)
    JOIN generations AS g USING (generation_id)
    WHERE a.label IS DISTINCT FROM b.label
),
new_pairs AS (
    SELECT 'new pair' AS change, s.generation_id, s.prompt_id, s.image_id,
           NULL AS label_a, s.pair_label AS label_b, s."full"::DOUBLE AS score
    FROM pair_scores AS s
    WHERE s.pair_label IN ('VM', 'FM', 'BM') AND s.run_id IN (SELECT run_id FROM runs_b)
),
detected_before AS (
    SELECT DISTINCT n.prompt_id FROM nemo_prompts AS n JOIN runs AS r USING (run_id)
    WHERE n.memorized AND r.started_at <= (SELECT ended FROM end_a)
),
newly_detected AS (
    SELECT 'newly detected' AS change, NULL AS generation_id, n.prompt_id, NULL AS image_id,
           NULL AS label_a, NULL AS label_b, n.detect_score::DOUBLE AS score
    FROM nemo_prompts AS n
    WHERE n.memorized AND n.run_id IN (SELECT run_id FROM runs_b)
      AND n.prompt_id NOT IN (SELECT prompt_id FROM detected_before)
)
SELECT d.change, p.text AS prompt, d.label_a, d.label_b, d.score, d.generation_id, d.image_id, d.prompt_id
FROM (SELECT * FROM changed UNION ALL SELECT * FROM new_pairs UNION ALL SELECT * FROM newly_detected) AS d
LEFT JOIN prompts AS p ON p.prompt_id = d.prompt_id
ORDER BY d.change, d.label_b NULLS LAST, prompt, d.generation_id, d.image_id;
