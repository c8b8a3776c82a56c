-- NeMo's neuron sets per layer: per scope (a prompt's own sets, a cluster's union) and kind
-- (initial, refined, union), how many sets and neurons each value layer holds.
SELECT
    scope,
    kind,
    layer_idx,
    any_value(module) AS module,
    count(*) AS sets,
    sum(len(neurons)) AS neurons,
    round(avg(len(neurons)), 1) AS mean_per_set
FROM neurons
GROUP BY scope, kind, layer_idx
ORDER BY scope, kind, layer_idx;
