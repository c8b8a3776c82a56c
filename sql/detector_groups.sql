-- Two memorization detectors per prompt group (`fbmem detect --method nemo|wen`): the toy
-- world's planted groups (group_kind 'planted': VM / FM / BM / NM), the reference set's mem_type
-- (group_kind 'mem_type': VM / TM), other prompts ('none'), and every prompt ('all'). Per group
-- and model: how many prompts each method scored, its mean score, and its mean cost per prompt
-- (UNet evaluations of one latent row, seconds); rank_corr is the Pearson correlation of the two
-- methods' ranks (detector_agreement.sql's, over all the model's prompts) among the group's
-- prompts scored by both: a Spearman-style agreement, 1 = same order. Latest row per prompt and
-- method unless `nemo_settings` / `wen_settings` name a settings_hash.
-- param nemo_settings = ''
-- param wen_settings = ''
WITH latest AS (
    SELECT prompt_id, method, model_id, score, unet_calls, seconds
    FROM detections
    WHERE (method = 'nemo' AND ($nemo_settings = '' OR settings_hash = $nemo_settings))
       OR (method = 'wen' AND ($wen_settings = '' OR settings_hash = $wen_settings))
    QUALIFY row_number() OVER (PARTITION BY prompt_id, method, model_id ORDER BY created_at DESC, detection_id) = 1
),
ranked AS (
    SELECT *, rank() OVER (PARTITION BY method, model_id ORDER BY score DESC NULLS LAST) AS score_rank
    FROM latest
),
per_prompt AS (
    SELECT
        r.prompt_id,
        r.model_id,
        CASE WHEN p.planted IS NOT NULL THEN 'planted' WHEN p.mem_type IS NOT NULL THEN 'mem_type' ELSE 'none' END
            AS group_kind,
        coalesce(p.planted, p.mem_type, '(none)') AS grp,
        max(r.score) FILTER (WHERE r.method = 'nemo') AS nemo_score,
        max(r.score_rank) FILTER (WHERE r.method = 'nemo') AS nemo_rank,
        max(r.unet_calls) FILTER (WHERE r.method = 'nemo') AS nemo_unet_calls,
        max(r.seconds) FILTER (WHERE r.method = 'nemo') AS nemo_seconds,
        max(r.score) FILTER (WHERE r.method = 'wen') AS wen_score,
        max(r.score_rank) FILTER (WHERE r.method = 'wen') AS wen_rank,
        max(r.unet_calls) FILTER (WHERE r.method = 'wen') AS wen_unet_calls,
        max(r.seconds) FILTER (WHERE r.method = 'wen') AS wen_seconds
    FROM ranked AS r
    LEFT JOIN prompts AS p USING (prompt_id)
    GROUP BY r.prompt_id, r.model_id, p.planted, p.mem_type
)
SELECT
    model_id,
    CASE WHEN GROUPING(group_kind) = 1 THEN 'all' ELSE group_kind END AS group_kind,
    CASE WHEN GROUPING(grp) = 1 THEN '(all)' ELSE grp END AS grp,
    count(*) AS prompts,
    count(nemo_score) AS nemo_prompts,
    round(avg(nemo_score), 4) AS mean_nemo_score,
    count(wen_score) AS wen_prompts,
    round(avg(wen_score), 4) AS mean_wen_score,
    round(corr(nemo_rank, wen_rank), 4) AS rank_corr,
    round(avg(nemo_unet_calls), 1) AS mean_nemo_unet_calls,
    round(avg(wen_unet_calls), 1) AS mean_wen_unet_calls,
    round(avg(nemo_seconds), 4) AS mean_nemo_seconds,
    round(avg(wen_seconds), 4) AS mean_wen_seconds
FROM per_prompt
GROUP BY GROUPING SETS ((model_id, group_kind, grp), (model_id))
ORDER BY model_id, GROUPING(grp) DESC,
    list_position(['planted', 'mem_type', 'none'], group_kind),
    list_position(['VM', 'FM', 'BM', 'TM', 'NM'], grp) NULLS LAST, grp;
