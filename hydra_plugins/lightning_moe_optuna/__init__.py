"""lightning-moe's Optuna sweeper for Hydra (`python train.py -m +sweep=optuna`, conf/sweep/optuna.yaml).

Trials are asked from an Optuna study in batches of n_jobs, launched through Hydra's launcher and told back;
the study lives in an Optuna journal file, so running the same command again continues it. Hydra finds this
package through the `hydra_plugins` namespace (deliberately a namespace package: no `__init__.py`) and imports
its public modules on every run, so Optuna itself is imported only once a sweep starts.
"""
