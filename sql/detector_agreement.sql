-- Two memorization detectors side by side, per prompt (`fbmem detect --method nemo|wen`): each
-- method's score and its rank among the prompts that method scored for the same model (1 = the
-- most memorized-looking), how far the two ranks lie apart, and what each score cost (UNet
-- evaluations of one latent row, seconds in the actor). A prompt scored by one method only has
-- NULLs for the other. When a method was run with several settings, the latest row of each
-- prompt counts, unless `nemo_settings` / `wen_settings` name a settings_hash to use.
-- param nemo_settings = ''
-- param wen_settings = ''
WITH latest AS (
    SELECT prompt_id, method, model_id, score, settings_hash, unet_calls, seconds
    FROM detections
    WHERE (method = 'nemo' AND ($nemo_settings = '' OR settings_hash = $nemo_settings))
       OR (method = 'wen' AND ($wen_settings = '' OR settings_hash = $wen_settings))
    QUALIFY row_number() OVER (PARTITION BY prompt_id, method, model_id ORDER BY created_at DESC, detection_id) = 1
),
ranked AS (
    SELECT *, rank() OVER (PARTITION BY method, model_id ORDER BY score DESC NULLS LAST) AS score_rank
    FROM latest
),
nemo AS (SELECT * FROM ranked WHERE method = 'nemo'),
wen AS (SELECT * FROM ranked WHERE method = 'wen')
SELECT
    coalesce(n.prompt_id, w.prompt_id) AS prompt_id,
    coalesce(p.text, coalesce(n.prompt_id, w.prompt_id)) AS prompt,
    p.planted,
    p.mem_type,
    coalesce(n.model_id, w.model_id) AS model_id,
    n.score AS nemo_score,
    n.score_rank AS nemo_rank,
    w.score AS wen_score,
    w.score_rank AS wen_rank,
    abs(n.score_rank - w.score_rank) AS rank_gap,
    n.unet_calls AS nemo_unet_calls,
    w.unet_calls AS wen_unet_calls,
    n.seconds AS nemo_seconds,
    w.seconds AS wen_seconds,
    n.settings_hash AS nemo_settings,
    w.settings_hash AS wen_settings
FROM nemo AS n
FULL OUTER JOIN wen AS w ON w.prompt_id = n.prompt_id AND w.model_id = n.model_id
LEFT JOIN prompts AS p ON p.prompt_id = coalesce(n.prompt_id, w.prompt_id)
ORDER BY model_id, least(n.score_rank, w.score_rank), prompt;
