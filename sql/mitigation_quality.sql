-- What mitigation costs in image quality (jobs/quality.py), per method and alpha, overall (level
-- 'overall') and per prompt cluster (level 'cluster'; cluster_id NULL there = prompts never
-- clustered), one row per metric:
--   clip_score         prompt-image cosine (configured CLIP): before / after means, value = after - before
--   fd_clip, kid_clip  Frechet distance and KID (value; kid: value_std over subsets) between the
--                      before set and the after set of CLIP image embeddings
--   other names        pyiqa metrics (dbcnn, qalign, ...): before / after means, value = after - before;
--                      a note "skipped: ..." when their weights are not on the machine
-- n_pairs: (prompt, seed, sample) pairs measured. Join with sql/mitigation_score.sql on
-- (method, alpha, level, cluster_id) for the trade-off: score gained against quality lost.
SELECT
    method,
    alpha,
    level,
    cluster_id,
    metric,
    before,
    after,
    value,
    value_std,
    n_pairs,
    note,
    model_id,
    computed_at
FROM mitigation_quality
ORDER BY method, alpha NULLS FIRST, level DESC, cluster_id NULLS FIRST,
    CASE metric WHEN 'clip_score' THEN 0 WHEN 'fd_clip' THEN 1 WHEN 'kid_clip' THEN 2 ELSE 3 END, metric;
