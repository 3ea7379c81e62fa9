"""`pfc data synth|inspect` and `pfc convert images|mxrec`: make, convert and check datasets.

Every command reports bad input as one line naming the file (and record) and exits with 1.
"""

from __future__ import annotations

import argparse
import functools
import sys

from launch import commands


def add_parser(sub) -> None:
    data = commands.add(sub, "data")
    kinds = data.add_subparsers(dest="data_kind", metavar="KIND", required=True)

    synth = commands.add(
        kinds,
        "synth",
        "write a synthetic face-like identity dataset (+ verification.bin)",
        (
            "pfc data synth data/synth --identities 200 --images-per-identity 20 --shards 4",
            "pfc data synth s3://bucket/synth --identities 100000 --images-per-identity 50 --shards 256",
        ),
    )
    synth.add_argument("out", metavar="OUT", help="output directory (local or s3://, gs://, hdfs://)")
    synth.add_argument("--identities", type=int, required=True, help="number of identities (classes)")
    synth.add_argument("--images-per-identity", type=int, required=True, help="images of each identity")
    synth.add_argument("--shards", type=int, required=True, help="number of TFRecord shard files")
    synth.add_argument("--size", type=int, default=112, help="image height = width in pixels (default 112)")
    synth.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same bytes")
    synth.add_argument(
        "--verification-pairs",
        type=int,
        default=200,
        help="genuine pairs in verification.bin (as many impostor pairs; default 200)",
    )
    _add_resume(synth)
    synth.set_defaults(func=_guarded(_synth))

    _add_fonts(kinds)

    insp = commands.add(
        kinds,
        "inspect",
        "counts per shard and class, label range; decode every record",
        ("pfc data inspect data/synth", "pfc data inspect 'data/ms1m/train-*.tfrecord' --no-decode"),
    )
    insp.add_argument("path", metavar="PATH", help="dataset directory, manifest.json, shard file or glob")
    insp.add_argument("--no-decode", action="store_true", help="skip JPEG decoding (framing, parsing, labels only)")
    insp.set_defaults(func=_guarded(_inspect))

    conv = commands.add(sub, "convert")
    ckinds = conv.add_subparsers(dest="convert_kind", metavar="KIND", required=True)
    img = commands.add(
        ckinds,
        "images",
        "SRC_DIR/<identity>/<images> (ImageFolder) to TFRecords",
        ("pfc convert images ~/photos data/photos --shards 8",),
    )
    img.add_argument("src", metavar="SRC_DIR", help="a folder per identity, its images inside")
    img.add_argument("out", metavar="OUT", help="output directory (local or s3://, gs://, hdfs://)")
    img.add_argument("--shards", type=int, required=True, help="number of TFRecord shard files")
    img.add_argument(
        "--size", type=int, default=112, help="store SIZE x SIZE images (default 112, the face convention)"
    )
    img.add_argument(
        "--fit",
        choices=("crop", "pad"),
        default="crop",
        help="a non-square image: crop its centred square (default) or pad it with black",
    )
    img.add_argument(
        "--skip-bad",
        action="store_true",
        help="write the readable images and list the unreadable ones in the manifest "
        "(default: name every unreadable file and write nothing)",
    )
    _add_resume(img)
    img.set_defaults(func=_guarded(_convert_images))
    mx = commands.add(
        ckinds,
        "mxrec",
        "InsightFace train.rec + train.idx + property, without MXNet",
        ("pfc convert mxrec faces_emore/train.rec data/ms1m --shards 64",),
    )
    mx.add_argument("rec", metavar="PATH/train.rec", help="the .rec file; its .idx and property beside it")
    mx.add_argument("out", metavar="OUT", help="output directory (local or s3://, gs://, hdfs://)")
    mx.add_argument("--shards", type=int, required=True, help="number of TFRecord shard files")
    _add_resume(mx)
    mx.set_defaults(func=_guarded(_convert_mxrec))


def _add_fonts(kinds) -> None:
    from pipelines.fonts import CLASS_SETS, DEFAULT_MIN_FACES

    p = commands.add(
        kinds,
        "fonts",
        "real data: CJK characters drawn by the installed typefaces (make "
        "fonts), as an open-set dataset: training shards, two verification .bin sets (unseen "
        "characters in training / unseen typefaces) and a closed set (training characters in "
        "unseen typefaces)",
        (
            "pfc data fonts data/fonts64 --size 64 --per-style 1",
            "pfc data fonts data/fonts_all --classes all --size 64 --per-style 1",
            "pfc data fonts data/two --fonts /usr/share/fonts/truetype/arphic/ukai.ttc "
            "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc --max-classes 200",
        ),
    )
    p.add_argument("out", metavar="OUT", help="new local output folder (must not exist)")
    p.add_argument(
        "--fonts",
        nargs="+",
        default=None,
        metavar="FILE",
        help="font files to use (default: every font under --font-dir)",
    )
    p.add_argument(
        "--font-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="where to look for fonts (repeatable; default /usr/share/fonts, /usr/local/share/fonts)",
    )
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    p.add_argument("--per-style", type=int, default=4, help="training samples per (character, style) (default 4)")
    p.add_argument(
        "--min-faces",
        type=int,
        default=None,
        help=f"distinct styles a character must be drawn in to be a class (default "
        f"{DEFAULT_MIN_FACES}, lowered to the number of styles when fewer)",
    )
    p.add_argument(
        "--classes",
        choices=CLASS_SETS,
        default="gb2312-1",
        help="candidate characters: GB2312 level 1 (3,755) or every CJK ideograph (default gb2312-1)",
    )
    p.add_argument("--unseen-classes", type=float, default=0.1, help="share of characters held out (default 0.1)")
    p.add_argument(
        "--unseen-faces", type=float, default=0.2, help="share of styles held out, whole families (default 0.2)"
    )
    p.add_argument("--pairs", type=int, default=6000, help="pairs per verification set, half genuine (default 6000)")
    p.add_argument("--max-classes", type=int, default=None, help="keep only the first N classes (small runs)")
    p.add_argument("--max-faces", type=int, default=None, help="keep only the first N styles by name (small runs)")
    p.add_argument("--shards", type=int, default=8, help="training shard files (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed and fonts write the same bytes")
    p.add_argument("--processes", type=int, default=None, help="rendering processes (default: the cores)")
    p.set_defaults(func=_guarded(_fonts))


def _add_resume(p) -> None:
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="rewrite every shard (default: keep complete shards of an interrupted run)",
    )


def _guarded(fn):
    """Bad input -> one line on stderr naming file/record, exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        import tensorflow as tf

        from pipelines import schema

        try:
            return fn(args)
        except (schema.DataError, ValueError) as e:
            print(f"pfc {args.command}: error: {e}", file=sys.stderr)
        except tf.errors.OpError as e:
            print(f"pfc {args.command}: error: {schema.first_line(e)}", file=sys.stderr)
        return 1

    return run


def _log(msg: str) -> None:
    print(msg, flush=True)


def _synth(args) -> int:
    from pipelines import synth

    if args.shards < 1:
        raise ValueError(f"--shards must be >= 1, got {args.shards}")
    cfg = synth.SynthConfig(args.identities, args.images_per_identity, args.size, args.seed, args.verification_pairs)
    m = synth.write_synth(args.out, cfg, args.shards, resume=args.resume, log=_log)
    print(
        f"wrote {m.num_examples} images of {m.num_classes} identities in {len(m.shards)} shards "
        f"and {synth.VERIFICATION_NAME} ({2 * args.verification_pairs} pairs) to {args.out}"
    )
    return 0


def _fonts(args) -> int:
    import os

    from pipelines import fonts, fonts_data, typefaces

    cfg = fonts.FontsConfig(
        size=args.size,
        per_style=args.per_style,
        min_faces=args.min_faces,
        classes=args.classes,
        unseen_classes=args.unseen_classes,
        unseen_faces=args.unseen_faces,
        pairs=args.pairs,
        shards=args.shards,
        seed=args.seed,
        max_classes=args.max_classes,
        max_faces=args.max_faces,
    )
    if os.path.exists(args.out):
        raise ValueError(f"{args.out}: already exists; pick a new output folder or remove it")
    plan, _ = fonts.build_plan(cfg, args.fonts, args.font_dir or typefaces.DEFAULT_FONT_DIRS)
    for note in plan.notes:
        _log(f"note: {note}")
    _log(fonts.summary(plan))
    counts = fonts_data.write_fonts(args.out, cfg, plan, processes=args.processes or os.cpu_count() or 1, log=_log)
    print(
        f"wrote {counts['train']} training images of {len(plan.classes)} characters, {counts['closed']} "
        f"closed-set images, {fonts.SEEN_BIN} and {fonts.UNSEEN_BIN} ({counts['seen_pairs']} pairs each) "
        f"to {args.out}"
    )
    return 0


def _inspect(args) -> int:
    from pipelines import check

    report = check.inspect(args.path, decode=not args.no_decode)
    print(report.summary())
    return 0 if report.ok else 1


def _convert_images(args) -> int:
    from pipelines import folders

    m = folders.convert(
        args.src,
        args.out,
        args.shards,
        size=args.size,
        fit=args.fit,
        skip_bad=args.skip_bad,
        resume=args.resume,
        log=_log,
    )
    skipped = f" ({len(m.skipped)} unreadable files skipped, listed in the manifest)" if m.skipped else ""
    print(
        f"wrote {m.num_examples} images of {m.num_classes} identities in {len(m.shards)} shards to {args.out}{skipped}"
    )
    return 0


def _convert_mxrec(args) -> int:
    from pipelines import mxrec

    m = mxrec.convert(args.rec, args.out, args.shards, resume=args.resume, log=_log)
    print(f"wrote {m.num_examples} images of {m.num_classes} identities in {len(m.shards)} shards to {args.out}")
    return 0
