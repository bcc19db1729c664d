"""TorchRec embedding tables for the configured sparse features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

from recsys_moe.config.schema import Pooling, SparseFeature

_POOLING = {Pooling.sum: PoolingType.SUM, Pooling.mean: PoolingType.MEAN}


def table_configs(
    features: Sequence[SparseFeature], embedding_dim: int
) -> list[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per table; features naming the same `table` share it.

    Features of one table must agree on num_embeddings and pooling (TorchRec pools per table).
    """
    if embedding_dim < 1:
        raise ValueError(f"model.embedding_dim ({embedding_dim}) must be >= 1")
    tables: dict[str, EmbeddingBagConfig] = {}
    owner: dict[str, int] = {}
    for i, f in enumerate(features):
        if f.num_embeddings < 1:
            raise ValueError(
                f"data.sparse[{i}] ({f.name}).num_embeddings ({f.num_embeddings}) must be >= 1"
            )
        name = f.table_name
        if name not in tables:
            tables[name] = EmbeddingBagConfig(
                name=name,
                embedding_dim=embedding_dim,
                num_embeddings=f.num_embeddings,
                feature_names=[f.name],
                pooling=_POOLING[f.pooling],
            )
            owner[name] = i
            continue
        t = tables[name]
        first = features[owner[name]]
        if f.num_embeddings != t.num_embeddings:
            raise ValueError(
                f"data.sparse[{i}] ({f.name}).num_embeddings ({f.num_embeddings}) differs from "
                f"{first.name}'s ({t.num_embeddings}) although both use table '{name}'"
            )
        if _POOLING[f.pooling] != t.pooling:
            raise ValueError(
                f"data.sparse[{i}] ({f.name}).pooling ({f.pooling.value}) differs from "
                f"{first.name}'s ({first.pooling.value}) although both use table '{name}'"
            )
        t.feature_names.append(f.name)
    return list(tables.values())


def build_embedding_bags(
    features: Sequence[SparseFeature], embedding_dim: int, device: torch.device
) -> EmbeddingBagCollection:
    """An EmbeddingBagCollection over the features' tables.

    Build it on the meta device when TorchRec's DistributedModelParallel will shard it: the
    sharded tables are then allocated once, on their owners, by FBGEMM.

    Output of ebc(kjt): KeyedTensor with one [B, embedding_dim] pooled embedding per feature.
    """
    return EmbeddingBagCollection(tables=table_configs(features, embedding_dim), device=device)
