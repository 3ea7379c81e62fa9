"""Run by horovodrun -np 2: worker 1 passes one more sample than worker 0, which must fail loudly."""

import os
import sys

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import cluster  # noqa: E402
import partitioned_fc  # noqa: E402

comm = cluster.init()
fc = partitioned_fc.PartitionedFC(10, 4, cluster=comm)
b = 4 + comm.rank
loss = fc(tf.ones([b, 4]), tf.zeros([b], tf.int64))
print("NO ERROR", float(loss), flush=True)
