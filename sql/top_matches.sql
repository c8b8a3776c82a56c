-- The most similar (generation, training image) pairs: what to look at first. Ranked by the
-- larger of the full-image score and the foreground/background mean.
-- param limit = 50
SELECT
    s.generation_id,
    s.image_id,
    g.prompt,
    t.source_uri AS training_source,
    s.candidate_source,
    s.rank,
    round(s.full, 4) AS full,
    round(s.fg, 4) AS fg,
    round(s.bg, 4) AS bg,
    s.pair_label
FROM pair_scores AS s
JOIN generations AS g USING (generation_id)
JOIN training_images AS t USING (image_id)
ORDER BY greatest(s.full, 0.5 * s.fg + 0.5 * s.bg) DESC
LIMIT $limit;
