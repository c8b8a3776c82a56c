-- NeMo per prompt (SPEC section 6): the detection score and whether the prompt counts as
-- memorized, then the neuron search's outcome (initial and refined set sizes and scores, whether
-- the mitigation criterion was reached, its message). `localized_only = true` keeps the prompts
-- the search ran for.
-- param localized_only = false
SELECT
    n.prompt_id,
    coalesce(p.text, n.prompt_id) AS prompt,
    p.planted,
    n.model_id,
    n.detect_score,
    n.detect_mean,
    n.n_retained,
    n.memorized,
    n.criterion_reached,
    n.n_initial,
    n.n_refined,
    n.initial_score,
    n.refined_score,
    n.theta,
    n.k,
    n.unet_calls,
    n.message
FROM nemo_prompts AS n
LEFT JOIN prompts AS p USING (prompt_id)
WHERE NOT $localized_only OR n.n_initial IS NOT NULL
ORDER BY n.detect_score DESC NULLS LAST, prompt;
