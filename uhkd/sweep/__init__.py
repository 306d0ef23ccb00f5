"""Sweeps: Ray Tune + Optuna, one `uhkd.train` run per trial (in the trial's own process for one worker, a Ray Train
TorchTrainer for two or more), with Parquet results (docs/sweeps.md).

`cluster` attaches to Ray, `cli` holds the shared flags, `spec` the sweep presets, `trainable` the Tune function
trainable, `results` the Parquet tables, `callbacks` the driver-side Tune callbacks, `runner` puts them together and
`teachers` makes the teacher checkpoints. The scripts in `sweeps/` only define their search space or grid.
"""
