"""FAST activation streaming: per-instance harvesting on a Ray Data actor pool, sharded SAE training on Ray Train.

    config.py    SaeTrainConfig (the jobs/train_sae.py schema) and load_sae_config
    harvest.py   rendering, length bucketing, one truncated forward → activation rows; the Harvester UDF
    pipeline.py  the lazy Ray Data activation dataset (actor pool, optional parquet shard cache)
    sharded.py   data-parallel / latent-sharded SAE training loop for Ray Train, checkpoints
    report.py    held-out evaluation → sae_report.json / .md
    run.py       the driver: train_sae(config)
"""
