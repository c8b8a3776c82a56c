-- The strongest cases per label class: one row per generation (its current label and the
-- training image that label points to), the `per_label` strongest of each class, ranked like
-- top_matches.sql ranks pairs; most severe class first (VM, FM, BM, NM). The report's gallery.
-- param rule = most-severe
-- param per_label = 4
-- current_labels: the latest label of each generation under each rule (storage/sql.py)
SELECT
    l.generation_id,
    l.best_image_id,
    l.label,
    l.reason,
    l.region_metric,
    l."full" AS "full",
    l.fg,
    l.bg,
    greatest(l."full", 0.5 * l.fg + 0.5 * l.bg) AS strength,
    g.prompt,
    g.mitigation,
    g.seed,
    g.sample
FROM current_labels AS l
JOIN generations AS g USING (generation_id)
WHERE l.rule = $rule AND l.best_image_id IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY l.label ORDER BY strength DESC NULLS LAST, l.generation_id) <= $per_label
ORDER BY list_position(['VM', 'FM', 'BM', 'NM'], l.label) NULLS LAST, strength DESC NULLS LAST;
