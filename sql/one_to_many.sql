-- One-to-many correspondence (SPEC section 4): per prompt, how many DISTINCT training images its
-- generations' labels point to, per label class. Many distinct matches for one prompt means
-- concept-level memorization rather than one memorized image.
-- param rule = most-severe
-- param mitigation = none
-- current_labels: the latest label of each generation under each rule (storage/sql.py)
SELECT
    g.prompt_id,
    any_value(g.prompt) AS prompt,
    any_value(p.planted) AS planted,
    count(DISTINCT g.generation_id) AS generations,
    count(DISTINCT l.best_image_id) FILTER (WHERE l.label = 'VM') AS distinct_vm_images,
    count(DISTINCT l.best_image_id) FILTER (WHERE l.label = 'FM') AS distinct_fm_images,
    count(DISTINCT l.best_image_id) FILTER (WHERE l.label = 'BM') AS distinct_bm_images,
    count(DISTINCT l.best_image_id) FILTER (WHERE l.label IN ('VM', 'FM', 'BM')) AS distinct_memorized_images
FROM current_labels AS l
JOIN generations AS g USING (generation_id)
LEFT JOIN prompts AS p ON p.prompt_id = g.prompt_id
WHERE l.rule = $rule AND g.mitigation = $mitigation
GROUP BY g.prompt_id
ORDER BY distinct_memorized_images DESC, generations DESC, prompt;
