"""Task priors, MixtureDataset (the mixture of a setting's tasks), and the HDF5 store of an experiment's data.

Imports neither Hydra, OmegaConf, Accelerate nor normscale.dist: rank and world size are arguments.
"""
from normscale.data.dataset import MixtureDataset, draw_task_pools, make_eval_splits
from normscale.data.priors import constant_freq_task_ids, task_prior_weights
from normscale.data.store import (DataIntegrityError, GeneratedBatches, ShardReader, load_eval_splits, load_single_task_split,
                                  load_task_pools, open_train_batches, plan_data, prepare_data)
