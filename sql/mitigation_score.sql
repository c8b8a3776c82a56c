-- Mitigation score (SPEC section 8) per method and alpha (the deactivation scale: a dampening
-- sweep keeps one score per alpha), overall (level 'overall') and per prompt
-- cluster (level 'cluster'; cluster_id NULL there = prompts never clustered): each (prompt, seed, sample) generated before (mitigation 'none') and after a
-- mitigation contributes the weight of its label transition (rows before, columns after):
--          VM    BM    FM    NM
--   VM      0   1.5   0.5    2
--   BM   -1.5     0  -0.5  0.5
--   FM   -0.5     1     0  1.5
--   NM     -2  -0.5  -1.5    0
-- The score is the mean weight; the columns vm_to_nm, ... are the transition counts, and
-- vm_before / vm_after count verbatim generations before and after. jobs/mitigation_score.py is
-- the same computation in Python (tested against this query).
-- param rule = most-severe
-- current_labels: the latest label of each generation under each rule (storage/sql.py)
WITH labelled AS (
    SELECT g.prompt_id, g.seed, g.sample, g.mitigation, g.alpha, g.model_id, l.label
    FROM generations AS g
    JOIN current_labels AS l USING (generation_id)
    WHERE l.rule = $rule
),
pairs AS (
    SELECT a.mitigation AS method, a.alpha, p.cluster_id, b.label AS before, a.label AS after
    FROM labelled AS b
    JOIN labelled AS a
      ON a.prompt_id = b.prompt_id AND a.seed = b.seed AND a.sample = b.sample AND a.model_id = b.model_id
    LEFT JOIN prompts AS p ON p.prompt_id = b.prompt_id
    WHERE b.mitigation = 'none' AND a.mitigation <> 'none'
),
weighted AS (
    SELECT *,
        CASE before || '>' || after
            WHEN 'VM>BM' THEN 1.5 WHEN 'VM>FM' THEN 0.5 WHEN 'VM>NM' THEN 2.0
            WHEN 'BM>VM' THEN -1.5 WHEN 'BM>FM' THEN -0.5 WHEN 'BM>NM' THEN 0.5
            WHEN 'FM>VM' THEN -0.5 WHEN 'FM>BM' THEN 1.0 WHEN 'FM>NM' THEN 1.5
            WHEN 'NM>VM' THEN -2.0 WHEN 'NM>BM' THEN -0.5 WHEN 'NM>FM' THEN -1.5
            ELSE 0.0
        END AS weight
    FROM pairs
)
SELECT
    method,
    alpha,
    CASE WHEN GROUPING(cluster_id) = 1 THEN 'overall' ELSE 'cluster' END AS level,
    cluster_id,
    count(*) AS pairs,
    round(avg(weight), 4) AS mitigation_score,
    count(*) FILTER (WHERE before = 'VM') AS vm_before,
    count(*) FILTER (WHERE after = 'VM') AS vm_after,
    count(*) FILTER (WHERE before = 'VM' AND after = 'VM') AS vm_to_vm,
    count(*) FILTER (WHERE before = 'VM' AND after = 'BM') AS vm_to_bm,
    count(*) FILTER (WHERE before = 'VM' AND after = 'FM') AS vm_to_fm,
    count(*) FILTER (WHERE before = 'VM' AND after = 'NM') AS vm_to_nm,
    count(*) FILTER (WHERE before = 'BM' AND after = 'VM') AS bm_to_vm,
    count(*) FILTER (WHERE before = 'BM' AND after = 'BM') AS bm_to_bm,
    count(*) FILTER (WHERE before = 'BM' AND after = 'FM') AS bm_to_fm,
    count(*) FILTER (WHERE before = 'BM' AND after = 'NM') AS bm_to_nm,
    count(*) FILTER (WHERE before = 'FM' AND after = 'VM') AS fm_to_vm,
    count(*) FILTER (WHERE before = 'FM' AND after = 'BM') AS fm_to_bm,
    count(*) FILTER (WHERE before = 'FM' AND after = 'FM') AS fm_to_fm,
    count(*) FILTER (WHERE before = 'FM' AND after = 'NM') AS fm_to_nm,
    count(*) FILTER (WHERE before = 'NM' AND after = 'VM') AS nm_to_vm,
    count(*) FILTER (WHERE before = 'NM' AND after = 'BM') AS nm_to_bm,
    count(*) FILTER (WHERE before = 'NM' AND after = 'FM') AS nm_to_fm,
    count(*) FILTER (WHERE before = 'NM' AND after = 'NM') AS nm_to_nm
FROM weighted
GROUP BY GROUPING SETS ((method, alpha), (method, alpha, cluster_id))
ORDER BY method, alpha NULLS FIRST, level DESC, cluster_id NULLS FIRST;
