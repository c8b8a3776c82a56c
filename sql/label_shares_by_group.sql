-- Share of each FB-Mem label per planted prompt group (the toy world's VM / FM / BM / NM groups)
-- and mitigation: does each group get the label it was planted with, before and after
-- mitigation? Prompts without a `planted` value are left out. Unmitigated rows first.
-- param rule = most-severe
-- current_labels: the latest label of each generation under each rule (storage/sql.py)
SELECT
    g.mitigation,
    p.planted,
    count(DISTINCT p.prompt_id) AS prompts,
    count(*) AS generations,
    round(avg((l.label = 'VM')::INT), 4) AS share_VM,
    round(avg((l.label = 'FM')::INT), 4) AS share_FM,
    round(avg((l.label = 'BM')::INT), 4) AS share_BM,
    round(avg((l.label = 'NM')::INT), 4) AS share_NM
FROM current_labels AS l
JOIN generations AS g USING (generation_id)
JOIN prompts AS p ON p.prompt_id = g.prompt_id
WHERE l.rule = $rule AND p.planted IS NOT NULL AND g.mitigation IS NOT NULL
GROUP BY g.mitigation, p.planted
ORDER BY g.mitigation <> 'none', g.mitigation, list_position(['VM', 'FM', 'BM', 'NM'], p.planted) NULLS LAST, p.planted;
