"""`pfc train`'s loop: world-size equivalence, resuming at any world size, non-finite losses."""

import shutil

import numpy as np
import pytest
from helpers import horovodrun
from test_fc_distributed import rel
from workers import train_worker

import cluster
from launch import checkpoint as ckpt
from launch import train as train_lib
from launch.config import from_dict
from launch.trainer import TrainingError

pytestmark = pytest.mark.slow  # every test trains (in this process or horovodrun)

TOL = 2e-5


def run(n, tmp, name, run_dir, steps, chunk=None, loss="arcface"):
    out = tmp / name
    out.mkdir()
    argv = ["tests/workers/train_worker.py", str(out), str(run_dir), str(steps)]
    horovodrun(n, *argv, str(chunk or 0), loss)
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in range(n)]
    for key in ranks[0]:  # every worker sees the same replicated state
        for r in ranks[1:]:
            np.testing.assert_array_equal(r[key], ranks[0][key], err_msg=key)
    return ranks[0]


def assert_same_state(a, b, prefix_a, prefix_b, tol, where):
    keys = sorted(k[len(prefix_a) :] for k in a if k.startswith(prefix_a))
    assert keys and keys == sorted(k[len(prefix_b) :] for k in b if k.startswith(prefix_b)), where
    assert any(k.startswith("fc_momentum") for k in keys), "the optimizer state is compared too"
    for k in keys:
        x, y = a[prefix_a + k], b[prefix_b + k]
        if tol == 0:
            np.testing.assert_array_equal(x, y, err_msg=f"{where}: {k}")
        else:
            assert rel(x, y) <= tol, f"{where}: {k} differs by {rel(x, y)}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 6-step run per world size, and a 3-step run at 2 workers to resume from."""
    tmp = tmp_path_factory.mktemp("train")
    res = {n: run(n, tmp, f"full{n}", tmp / f"run_full{n}", 6, chunk=5 if n == 3 else None) for n in (1, 2, 3)}
    res["half"] = run(2, tmp, "half2", tmp / "run_half", 3)
    res["tmp"] = tmp
    return res


def test_global_batch_is_the_same_training_at_any_world_size(runs):
    """k steps at 1 worker with global batch 2B (and 3B) equal k steps at 2 workers with batch B."""
    for n in (2, 3):
        assert_same_state(runs[1], runs[n], "final_", "final_", TOL, f"1 vs {n} workers")
        assert runs[n]["loss"] == pytest.approx(float(runs[1]["loss"]), rel=1e-5)


@pytest.mark.parametrize("n", [1, 3])
def test_resume_at_another_world_size(runs, n):
    """Stop at 2 workers, resume at 1 and 3: the same rows and optimizer state, then the same run."""
    tmp = runs["tmp"]
    run_dir = tmp / f"run_resume{n}"
    shutil.copytree(tmp / "run_half", run_dir)
    got = run(n, tmp, f"resume{n}", run_dir, 6)
    assert int(got["resumed_step"]) == 3
    assert_same_state(got, runs["half"], "resumed_", "final_", 0, f"re-split 2 -> {n}")
    assert_same_state(got, runs[2], "final_", "final_", TOL, f"resumed at {n} vs uninterrupted at 2")
    manifest = ckpt.read_manifest(ckpt.latest(str(run_dir / "checkpoints")))
    assert manifest["world_size"] == n and manifest["step"] == 6


def test_subcenter_rows_resume_at_another_world_size(tmp_path):
    """Sub-center ArcFace: k rows per class split by class (k·class range per worker); stopped at
    2 workers and resumed at 3, the run equals the uninterrupted one at 2."""
    whole = run(2, tmp_path, "sc_whole", tmp_path / "run_sc_whole", 6, loss="subcenter")
    half = run(2, tmp_path, "sc_half", tmp_path / "run_sc", 3, loss="subcenter")
    got = run(3, tmp_path, "sc_resume", tmp_path / "run_sc", 6, chunk=2, loss="subcenter")
    assert whole["final_fc_weight"].shape == (3 * train_worker.NUM_CLASSES, 8)
    assert int(got["resumed_step"]) == 3
    assert_same_state(got, half, "resumed_", "final_", 0, "sub-centers re-split 2 -> 3")
    assert_same_state(got, whole, "final_", "final_", TOL, "sub-centers resumed at 3 vs uninterrupted at 2")
    manifest = ckpt.read_manifest(ckpt.latest(str(tmp_path / "run_sc" / "checkpoints")))
    assert manifest["fc"]["rows_per_class"] == 3
    assert [s["class_range"] for s in manifest["fc"]["shards"]] == [[0, 15], [15, 27], [27, 39]]  # rows


def _local_config(tmp_path, **train):
    raw = train_worker.config(str(tmp_path / "run"), 4, None)
    raw["train"].update(batch_size=6, **train)
    raw["checkpoint"]["every"] = 2
    return from_dict(raw)


def _data(bad_step):
    def make(start):
        for s in range(start, 100):
            images, labels = train_worker.global_batch(s)
            if s == bad_step:
                images = images * np.inf
            yield images, labels, 0

    return make


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    cfg = _local_config(tmp_path)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 2: .*ckpt-000000002\) is kept"):
        train_lib.train(
            cfg, cluster.init("local"), data=_data(2), steps_per_epoch=10, num_classes=train_worker.NUM_CLASSES
        )
    assert ckpt.latest(cfg.checkpoint_dir).endswith("ckpt-000000002")


def test_nonfinite_loss_can_be_skipped_and_counted(tmp_path):
    cfg = _local_config(tmp_path, nonfinite="skip")
    out = train_lib.train(
        cfg, cluster.init("local"), data=_data(1), steps_per_epoch=10, num_classes=train_worker.NUM_CLASSES
    )
    assert out["step"] == 4 and np.isfinite(out["loss"])
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert '"nonfinite_steps": 1' in log[-1]


def test_checkpoint_of_another_problem_is_an_error_before_any_work(tmp_path):
    cfg = _local_config(tmp_path)
    train_lib.train(
        cfg, cluster.init("local"), data=_data(-1), steps_per_epoch=10, num_classes=train_worker.NUM_CLASSES
    )
    other = from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "num_classes": 14}})
    with pytest.raises(ckpt.CheckpointError, match=r"num_classes=13 but the config says 14"):
        train_lib.train(other, cluster.init("local"), data=_data(-1), steps_per_epoch=10, num_classes=14)
    assert ckpt.latest(cfg.checkpoint_dir).endswith("ckpt-000000004")


def test_export_serves_unit_embeddings_of_the_checkpointed_backbone(tmp_path):
    """uint8 images of the training size, of another size (resized inside) and the float
    signature all give the checkpointed backbone's unit embeddings; flip_sum adds the mirror's."""
    import tensorflow as tf

    from launch import embed, export
    from launch.backbones import build_backbone

    cfg = _local_config(tmp_path)
    out = train_lib.train(
        cfg, cluster.init("local"), data=_data(-1), steps_per_epoch=10, num_classes=train_worker.NUM_CLASSES
    )
    saved = export.export(out["checkpoint"], str(tmp_path / "model"))
    loaded = tf.saved_model.load(saved)
    model = build_backbone("tiny", train_worker.IMAGE, 8, batch_norm=False, seed=99)
    ckpt.restore_backbone(out["checkpoint"], model.variables)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    pixels = np.random.default_rng(0).integers(0, 256, (3, train_worker.IMAGE, train_worker.IMAGE, 3), np.uint8)
    scaled = pixels.astype(np.float32) / 127.5 - 1
    want = unit(model(scaled, training=False).numpy())
    got = loaded.signatures["serving_default"](images=tf.constant(pixels))["embeddings"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    floats = loaded.signatures["float_images"](images=tf.constant(scaled))["embeddings"].numpy()
    np.testing.assert_allclose(floats, want, rtol=1e-4, atol=1e-6)
    flipped = unit(model(scaled, training=False).numpy() + model(scaled[:, :, ::-1], training=False).numpy())
    np.testing.assert_allclose(
        loaded.signatures["flip_sum"](images=tf.constant(pixels))["embeddings"].numpy(), flipped, rtol=1e-4, atol=1e-6
    )
    big = np.repeat(np.repeat(pixels, 7, axis=1), 7, axis=2)  # 112 x 112, the face convention
    resized = tf.clip_by_value(tf.round(tf.image.resize(big.astype(np.float32), [16, 16])), 0, 255) / 127.5 - 1
    np.testing.assert_allclose(
        loaded.signatures["serving_default"](images=tf.constant(big))["embeddings"].numpy(),
        unit(model(resized, training=False).numpy()),
        rtol=1e-4,
        atol=1e-6,
    )
    with pytest.raises(FileExistsError, match="already exists"):
        export.export(out["checkpoint"], saved)

    # pfc embed: a folder of images of two sizes, in sorted order, with their names
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    for i, img in enumerate(pixels):
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
    (folder / "b" / "big.png").write_bytes(tf.io.encode_png(big[0]).numpy())
    emb, names = embed.embed(saved, str(folder))
    assert names == ["0.png", "1.png", "2.png", "b/big.png"] and emb.shape == (4, 8)
    np.testing.assert_allclose(emb[:3], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "loss, stat",
    [
        ({"name": "curricularface", "scale": 16.0, "margin": 0.3}, "t"),
        ({"name": "sphereface2", "scale": 16.0, "loss_weight": 5.0}, "bias"),
    ],
    ids=["curricular_t", "sphereface2_bias"],
)
def test_a_running_statistic_resumes_exactly(tmp_path, loss, stat):
    """CurricularFace's t, SphereFace2's learned bias: a run stopped at step 2 and resumed ends
    with the uninterrupted run's value (and loss); the checkpoint keeps it in the manifest, so any
    world size reads the same value."""

    def run(run_dir, steps, resume=None):
        raw = train_worker.config(str(run_dir), steps, None)
        raw["train"]["batch_size"] = 6
        raw["checkpoint"]["every"] = 2
        raw["loss"] = dict(loss)
        out = train_lib.train(
            from_dict(raw),
            cluster.init("local"),
            data=_data(-1),
            steps_per_epoch=10,
            num_classes=train_worker.NUM_CLASSES,
        )
        return out, ckpt.read_manifest(out["checkpoint"])["fc"]["margin_state"][stat]

    start = from_dict({**train_worker.config("x", 4, None), "loss": loss}).loss.margin().state()[stat]
    whole, t_whole = run(tmp_path / "whole", 4)
    half, t_half = run(tmp_path / "split", 2)
    resumed, t_resumed = run(tmp_path / "split", 4)
    assert t_half != float(start.numpy()) and t_half != t_whole
    assert t_resumed == pytest.approx(t_whole, rel=1e-6)
    assert resumed["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_onnx_export_matches_the_savedmodel_on_uint8_images(tmp_path):
    """The ONNX file (onnxruntime) gives the SavedModel's embeddings for uint8 images of the
    training size, with and without the flip-sum; an existing file is refused."""
    pytest.importorskip("tf2onnx", reason="make onnx installs tf2onnx and onnxruntime")
    import onnxruntime as ort
    import tensorflow as tf

    from launch import export

    cfg = _local_config(tmp_path)
    out = train_lib.train(
        cfg, cluster.init("local"), data=_data(-1), steps_per_epoch=10, num_classes=train_worker.NUM_CLASSES
    )
    loaded = tf.saved_model.load(export.export(out["checkpoint"], str(tmp_path / "model")))
    module = export.Embedder(*export.load_backbone(out["checkpoint"]))
    pixels = np.random.default_rng(5).integers(0, 256, (5, train_worker.IMAGE, train_worker.IMAGE, 3), np.uint8)
    for flip, signature in ((False, "serving_default"), (True, "flip_sum")):
        path = str(tmp_path / f"model_{signature}.onnx")
        assert export.export_onnx(module, path, flip_sum=flip) <= export.ONNX_TOLERANCE
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (got,) = session.run(["embeddings"], {"images": pixels})
        want = loaded.signatures[signature](images=tf.constant(pixels))["embeddings"].numpy()
        assert np.max(np.abs(got - want)) <= 1e-4, signature
    # the two models differ (the flip-sum is really in one of them)
    assert not np.allclose(
        got, loaded.signatures["serving_default"](images=tf.constant(pixels))["embeddings"].numpy(), atol=1e-3
    )
    with pytest.raises(FileExistsError, match="already exists"):
        export.export_onnx(module, path)


def test_the_step_augments_uint8_batches_at_the_global_step(tmp_path):
    """The reader's uint8 batches, augmented inside the step, train exactly as the same batches
    augmented beforehand with the global step's coins (other coins flip other images: the loss
    would differ by far more than the tolerance)."""
    import tensorflow as tf

    from launch.trainer import Trainer
    from pipelines import reader

    cfg = _local_config(tmp_path)
    comm = cluster.init("local")
    rng = np.random.default_rng(0)
    in_step = Trainer(
        cfg, comm, num_classes=train_worker.NUM_CLASSES, augment=lambda x, step: reader.augment(x, 11, step)
    )
    before = Trainer(cfg, comm, num_classes=train_worker.NUM_CLASSES)
    for t in (in_step, before):
        t.set_total_steps(3)
    for step in range(3):
        pixels = rng.integers(0, 256, (6, train_worker.IMAGE, train_worker.IMAGE, 3), dtype=np.uint8)
        labels = train_worker.global_batch(step)[1]
        a = in_step.train_step(tf.constant(pixels), labels)
        b = before.train_step(reader.augment(tf.constant(pixels), 11, step), labels)
        assert a.loss == pytest.approx(b.loss, rel=1e-6)  # (the compiled step may fuse x/127.5-1)
    for x, y in zip(in_step.model.weights + [in_step.fc.weight], before.model.weights + [before.fc.weight]):
        assert rel(x.numpy(), y.numpy()) <= TOL


def test_the_compiler_scratch_is_handed_back_once_after_the_first_step(tmp_path, monkeypatch):
    """pfc's allocator keeps freed memory for reuse; the first step's compilation frees scratch
    that no later step reuses, so the trainer trims once, after that step, and never again (a
    trim every step would fault the step's temporaries in afresh each time)."""
    from launch import trainer as trainer_lib

    calls = []
    monkeypatch.setattr(trainer_lib, "release_free_memory", lambda: calls.append(1) or True)
    t = trainer_lib.Trainer(_local_config(tmp_path), cluster.init("local"), num_classes=train_worker.NUM_CLASSES)
    t.set_total_steps(3)
    for step in range(3):
        images, labels = train_worker.global_batch(step)
        t.train_step(images, labels)
        assert len(calls) == 1
