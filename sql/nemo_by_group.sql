-- NeMo detection per planted group (the toy world's VM / FM / BM / NM prompts; '(unknown)' for
-- prompts without one): detection scores (the max-of-max score and the mean pairwise score),
-- how many were detected as memorized, and how the neuron search went.
SELECT
    coalesce(p.planted, '(unknown)') AS planted,
    count(*) AS prompts,
    round(avg(n.detect_score), 4) AS mean_detect_score,
    round(min(n.detect_score), 4) AS min_detect_score,
    round(max(n.detect_score), 4) AS max_detect_score,
    round(avg(n.detect_mean), 4) AS mean_pairwise_score,
    count(*) FILTER (WHERE n.memorized) AS memorized,
    count(*) FILTER (WHERE n.criterion_reached) AS criterion_reached,
    round(avg(n.n_refined), 1) AS mean_refined_neurons
FROM nemo_prompts AS n
LEFT JOIN prompts AS p USING (prompt_id)
GROUP BY p.planted
ORDER BY list_position(['VM', 'FM', 'BM', 'NM'], p.planted) NULLS LAST, p.planted NULLS LAST;
