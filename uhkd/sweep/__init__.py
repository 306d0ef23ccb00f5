"""Sweeps: Ray Tune + Optuna over Ray Train trials, with Parquet results (see README "Sweeps").

`cluster` attaches to Ray, `cli` holds the shared flags, `spec` the sweep presets, `trainable` the Tune function
trainable, `results` the Parquet tables, `callbacks` the driver-side Tune callbacks, `runner` puts them together and
`teachers` makes the teacher checkpoints. The scripts in `sweeps/` only define their search space or grid.
"""
