"""Model-based data selection (`python -m jaxllm.select ...`):

  less.py, grads.py, projection.py   LESS (Xia et al. 2024): influence of training examples on a
                                     target set from Adam-preconditioned LoRA gradient features
  doremi.py                          DoReMi (Xie et al. 2023): domain weights from a group-DRO
                                     proxy run against a reference model, as a data.stages config
  objectives.py, rating_data.py,     QuRater (Wettig et al. 2024) and FineWeb-Edu style raters:
  records.py, scorers.py             scalar-head models (`task: rater`, `task: edu`), text scorers
                                     for the curation pipeline, exp(s / tau) sampling
  cli.py                             the command line

Dynamic batch loading (`data.dynamic_weights`) lives with the mixture (jaxllm.data.curriculum,
jaxllm.data.mixture) and the pretraining task (jaxllm.tasks.pretrain).

This package's __init__ imports nothing: `jaxllm.tasks.rating` uses its objectives and data
modules, and importing the training tools from here would make an import cycle.
"""
