"""recsys_moe: a trainer for embedding-heavy multi-task ranking models with a mixture-of-experts
trunk (DSelect-k, Top-k and softmax gates), TorchRec embedding tables and sharded Parquet input."""

__version__ = "0.1.0"
