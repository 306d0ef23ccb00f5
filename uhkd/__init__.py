"""uhkd-sweeps: heterogeneous knowledge distillation (UHKD and baselines) on timm models, swept with Ray Tune."""
__version__ = "0.1.0"
