-- The reference code's labelling rule, recomputed from pair_scores: for each generation take the
-- candidate with the highest 0.5*fg + 0.5*bg and label that pair (SPEC section 2), instead of
-- fbmem's default "most severe pair label". Compare the two with labels.rule = 'most-severe'.
-- param tau_full = 0.8
-- param tau_fg = 0.8
-- param tau_bg = 0.8
WITH best AS (
    SELECT
        generation_id,
        arg_max(image_id, 0.5 * fg + 0.5 * bg) AS best_image_id,
        arg_max("full", 0.5 * fg + 0.5 * bg) AS "full",
        arg_max(fg, 0.5 * fg + 0.5 * bg) AS fg,
        arg_max(bg, 0.5 * fg + 0.5 * bg) AS bg,
        count(*) AS n_candidates
    FROM pair_scores
    GROUP BY generation_id
)
SELECT
    generation_id,
    best_image_id,
    "full", fg, bg, n_candidates,
    CASE
        WHEN "full" >= $tau_full OR (fg >= $tau_fg AND bg >= $tau_bg) THEN 'VM'
        WHEN fg >= $tau_fg THEN 'FM'
        WHEN bg >= $tau_bg THEN 'BM'
        ELSE 'NM'
    END AS label,
    'paper-best-average' AS rule
FROM best
ORDER BY generation_id;
