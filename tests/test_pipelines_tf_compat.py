"""pipelines.tf_compat: the TensorFlow version check, and that it is the one home of TensorFlow's internals."""

import re
from pathlib import Path

import pytest
import tensorflow as tf

from pipelines import tf_compat

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@pytest.mark.parametrize("version", ["2.17.0", "2.17.1", "2.17.0rc2"])
def test_a_supported_version_passes(version):
    tf_compat.check_version(version)


@pytest.mark.parametrize("version", ["2.18.0", "2.1.7", "3.17.1", "2.16.2"])
def test_another_version_is_refused_saying_which_are_supported_and_what_to_do(version):
    with pytest.raises(ImportError) as e:
        tf_compat.check_version(version)
    message = str(e.value)
    assert f"TensorFlow {version} is installed" in message and "TensorFlow 2.17" in message
    assert "make setup" in message and "port pipelines/tf_compat.py" in message


def test_the_installed_tensorflow_is_supported():
    assert ".".join(tf.__version__.split(".")[:2]) in tf_compat.SUPPORTED


def test_tensorflow_internals_are_used_in_tf_compat_only():
    internal = re.compile(
        r"tensorflow\.python|_MapDataset|_ParallelMapDataset|tf\.load_op_library|\bdataset_ops\b|\bmap_op\b"
    )
    users = sorted(p.name for p in PIPELINES.glob("*.py") if internal.search(p.read_text()))
    assert users == ["tf_compat.py"]


@pytest.mark.parametrize("parallel, op", [(None, "MapDataset"), (2, "ParallelMapDatasetV2")])
def test_map_inline_maps_in_order_with_inter_op_parallelism_off(parallel, op):
    ds = tf_compat.map_inline(tf.data.Dataset.range(5), lambda x: 3 * x, parallel=parallel)
    assert list(ds.as_numpy_iterator()) == [0, 3, 6, 9, 12]
    maps = [n for n in tf_compat.dataset_graph(ds).node if n.op == op]
    assert len(maps) == 1 and not maps[0].attr["use_inter_op_parallelism"].b
    plain = [
        n for n in tf_compat.dataset_graph(tf.data.Dataset.range(5).map(lambda x: 3 * x)).node if n.op == "MapDataset"
    ]
    assert plain[0].attr["use_inter_op_parallelism"].b  # what tf.data's own map sets
