"""The DeepSpeed engine: ds_config building (ds_config), engine setup (setup), the training loop
(loop), checkpoints (checkpoint), TensorBoard/log file (logging), export (export), EMA (ema)."""
