-- For each prompt: how its generations were labelled (counts per class) and the worst label.
-- param rule = most-severe
-- param mitigation = none
-- current_labels: the latest label of each generation under each rule (storage/sql.py)
SELECT
    p.prompt_id,
    any_value(p.text) AS prompt,
    any_value(p.planted) AS planted,
    any_value(p.mem_type) AS mem_type,
    count(*) AS generations,
    count(*) FILTER (WHERE l.label = 'VM') AS vm,
    count(*) FILTER (WHERE l.label = 'FM') AS fm,
    count(*) FILTER (WHERE l.label = 'BM') AS bm,
    count(*) FILTER (WHERE l.label = 'NM') AS nm,
    CASE min(CASE l.label WHEN 'VM' THEN 0 WHEN 'FM' THEN 1 WHEN 'BM' THEN 2 ELSE 3 END)
        WHEN 0 THEN 'VM' WHEN 1 THEN 'FM' WHEN 2 THEN 'BM' ELSE 'NM' END AS worst_label
FROM current_labels AS l
JOIN generations AS g USING (generation_id)
JOIN prompts AS p ON p.prompt_id = g.prompt_id
WHERE l.rule = $rule AND g.mitigation = $mitigation
GROUP BY p.prompt_id
ORDER BY vm DESC, fm DESC, bm DESC, prompt;
