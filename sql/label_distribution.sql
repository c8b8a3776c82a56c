-- How many generations got each FB-Mem label (VM, FM, BM, NM), per mitigation, and the share
-- (each generation counted once, with its latest label under the rule).
-- param rule = most-severe
-- current_labels: the latest label of each generation under each rule (storage/sql.py)
SELECT
    g.mitigation,
    l.label,
    count(*) AS generations,
    round(count(*) / sum(count(*)) OVER (PARTITION BY g.mitigation), 4) AS share
FROM current_labels AS l
JOIN generations AS g USING (generation_id)
WHERE l.rule = $rule
GROUP BY g.mitigation, l.label
ORDER BY g.mitigation, CASE l.label WHEN 'VM' THEN 0 WHEN 'FM' THEN 1 WHEN 'BM' THEN 2 ELSE 3 END;
