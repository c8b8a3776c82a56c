"""NeMo (SPEC.md section 6): statistics, detection, the neuron search, the to_v hooks and the UNet-side evaluator."""
