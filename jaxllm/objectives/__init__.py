"""Training objectives. Each returns `(loss_sum, metrics)` where `metrics["weight"]` is the
denominator (tokens, pairs, ...) the train step divides by after summing over microbatches, so
gradient accumulation equals one big batch exactly."""
