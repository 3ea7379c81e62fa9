"""Margins, class sharding, the model-parallel layer and its exact loss. No I/O.

import cluster, partitioned_fc
from partitioned_fc import margins
fc = partitioned_fc.PartitionedFC(num_classes=C, embedding_dim=D,
                                  margin=margins.ArcFace(), cluster=cluster.init())
loss = fc(local_embeddings, local_labels)
"""

from partitioned_fc import margins
from partitioned_fc.layer import PartitionedFC
from partitioned_fc.reference import dense_logits, dense_loss
from partitioned_fc.sharding import all_shard_ranges, full_matrix, owner_of, shard_range

__all__ = [
    "PartitionedFC",
    "dense_loss",
    "dense_logits",
    "margins",
    "shard_range",
    "all_shard_ranges",
    "owner_of",
    "full_matrix",
]
